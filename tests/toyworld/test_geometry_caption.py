"""Stage 2a asks the prior for a normal map when its setting says so: the toy preset does (its
generator learnt captioned normal maps), the paper preset keeps the paper's prompt."""

from dataclasses import replace

import pytest
import torch

from dreamflow.config import ConfigError
from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline import stage2
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.pipeline.handoff import InputMesh
from dreamflow.toyworld.dataset import NORMAL_MAP_CAPTION
from dreamflow.toyworld.world import object_mesh


def test_the_toy_preset_asks_for_normal_maps_and_the_paper_preset_does_not():
    assert build_config("toy").geometry.normal_map_caption == ""  # the shipped generator never learnt normal maps
    assert build_config("toy", {"geometry.normal_map_caption": NORMAL_MAP_CAPTION}).geometry.normal_map_caption == NORMAL_MAP_CAPTION
    assert build_config("paper").geometry.normal_map_caption == ""
    assert build_config("paper", {"geometry.normal_map_caption": "normal map"}).geometry.normal_map_caption == "normal map"
    with pytest.raises(ConfigError, match="geometry.normal_map_caption"):
        build_config("toy", {"geometry.normal_map_caption": "bump map"})


def test_geometry_prompt_appends_the_caption_only_when_there_is_one():
    assert stage2.geometry_prompt("a red cube", "normal map") == "a red cube, normal map"
    assert stage2.geometry_prompt("a red cube", "") == "a red cube"
    assert stage2.geometry_prompt("", "normal map") == ""  # the unconditional prompt stays empty


class Asked(Exception):
    pass


@pytest.mark.parametrize("caption, expected", [("normal map", "a red cube, normal map"), ("", "a red cube")])
def test_stage_2a_conditions_the_prior_on_the_geometry_prompt(tmp_path, monkeypatch, caption, expected):
    asked = []

    class Prior:
        def condition(self, prompt, negative_prompt="", guidance=7.5):
            asked.append(prompt)
            raise Asked

    monkeypatch.setattr(stage2, "stage_models", lambda *a, **k: (Prior(), None, "none"))
    cfg = build_config("smoke", {"geometry.normal_map_caption": caption}, prompt="a red cube")
    ctx = JobContext(cfg, tmp_path, RecordingSink(), JobControl(), torch.device("cpu"))
    cube = object_mesh("cube")
    incoming = InputMesh(mesh=MeshData(vertices=cube.vertices.numpy(), faces=cube.faces.numpy()))
    with pytest.raises(Asked):
        stage2.GeometryStage().build(ctx, incoming)
    assert asked == [expected]
