"""Text to 3D with the shipped toy prior, end to end on one prompt with small settings: the result is
the prompted shape and colour by the ground-truth measures (nearest true object in silhouette over
the evaluation orbit, nearest true colour in CIELAB)."""

import numpy as np
import pytest

from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.files import read_glb
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job
from dreamflow.toyworld.evaluate import Renderable, evaluation_cameras, mean_colour, srgb_to_lab, true_object
from dreamflow.toyworld.world import COLOURS, SHAPES, prompt_for

#: The toy preset made small for CI: fewer steps in every stage, coarser meshes and textures.
SMALL = {"stage1.steps": 120, "geometry.steps": 20, "texture.steps": 40, "refine.steps": 10,
         "stage1.mesh_every": 1000, "geometry.mesh_every": 1000, "texture.mesh_every": 1000, "refine.mesh_every": 1000,
         "export.texture_size": 256, "export.view_resolution": 64, "stage1.mesh_resolution": 64}


@pytest.mark.slow
def test_the_toy_prior_makes_a_red_cube_from_its_prompt(tmp_path):
    cfg = build_config("toy", SMALL, prompt="a red cube", seed=0)
    sink = RecordingSink()
    run_job(cfg, tmp_path / "out", sink, JobControl())
    done = {e[1]["stage"]: e[1] for e in sink.of_kind("stage_done")}
    assert list(done) == ["stage1", "geometry", "texture", "refine"]
    assert done["stage1"]["report"]["score_model"] == "lora" and done["refine"]["report"]["score_model"] == "lora"
    asset = Renderable(read_glb(tmp_path / "out" / "model.glb"))
    cams = evaluation_cameras(24)
    images, alpha = asset.render(cams, 64)
    lab = srgb_to_lab(mean_colour(images, alpha))
    colour_error = {c: float(np.linalg.norm(lab - srgb_to_lab(mean_colour(*true_object(prompt_for("cube", c)).render(cams, 64)))))
                    for c in COLOURS}
    assert min(colour_error, key=colour_error.get) == "red", colour_error
    mask = alpha > 0.5
    iou = {}
    for shape in SHAPES:
        _, truth = true_object(prompt_for(shape, "red")).render(cams, 64)
        t = truth > 0.5
        iou[shape] = float((mask & t).sum()) / float((mask | t).sum())
    assert max(iou, key=iou.get) == "cube", iou
    assert iou["cube"] > 0.6, iou
