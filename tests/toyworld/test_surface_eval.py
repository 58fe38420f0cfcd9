"""The surface measures in the toy-world evaluation: per stage, in the job's report, in the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dreamflow.cli import main
from dreamflow.export.files import write_glb
from dreamflow.toyworld.evaluate import format_table, score_asset, score_stages, textured_true_object
from dreamflow.toyworld.evaluator import load_evaluator
from dreamflow.toyworld.scoring import ToyScorer

PROMPT = "a green cube"
VIEWS = 4


@pytest.fixture(scope="module")
def scorer():
    return ToyScorer(load_evaluator())


@pytest.fixture(scope="module")
def baked():
    return textured_true_object(PROMPT, 128)


def _big_sphere():
    """The true green sphere, baked, 1.3 times too big: a rough stage's stand-in for the cube."""
    sphere = textured_true_object("a green sphere", 128)
    return replace(sphere, vertices=sphere.vertices * 1.3)


def _speckled(mesh):
    """The baked cube with per-texel random brightness."""
    rng = np.random.default_rng(1)
    tex = np.clip(mesh.texture.astype(np.float64) * rng.uniform(0.5, 1.5, size=mesh.texture.shape[:2] + (1,)), 0, 255)
    return replace(mesh, texture=tex.astype(np.uint8))


def test_every_stage_gets_every_measure_and_the_worse_stage_scores_worse(scorer, baked):
    stages = score_stages({"stage1": _big_sphere(), "texture": baked, "refine": _speckled(baked)},
                          PROMPT, scorer, views=VIEWS)
    assert list(stages) == ["stage1", "texture", "refine"]
    for values in stages.values():
        assert all(values[k] is not None for k in ("r_precision", "normal_consistency", "area_ratio", "chamfer_aligned",
                                                   "half_extent", "colour_noise", "true_colour_noise"))
    rough, clean, speckled = stages["stage1"], stages["texture"], stages["refine"]
    assert clean["normal_consistency"] > 0.99 and rough["normal_consistency"] < clean["normal_consistency"] - 0.1
    assert rough["area_ratio"] == pytest.approx(0.52, abs=0.03) and rough["area_ratio_raw"] > 0.8
    assert rough["half_extent"] > 1.25 * clean["half_extent"] and rough["chamfer_aligned"] > 0.05
    assert speckled["normal_consistency"] == pytest.approx(clean["normal_consistency"])
    assert speckled["colour_noise"] > clean["colour_noise"] + 5.0


def test_the_job_report_carries_each_stage(baked, tmp_path):
    from dreamflow.cli.evaluate import FinalMeshes, add_toy_quality, format_toy_quality
    from dreamflow.events import RecordingSink
    from dreamflow.pipeline.config import build_config

    inner = RecordingSink()
    sink = FinalMeshes(inner)
    sink.emit("mesh", {"stage": "stage1", "step": 3, "final": False}, _big_sphere().arrays())
    sink.emit("mesh", {"stage": "stage1", "step": 9, "final": True}, baked.arrays())
    sink.emit("progress", {"stage": "stage1", "step": 9})
    assert list(sink.meshes) == ["stage1"] and np.array_equal(sink.meshes["stage1"].vertices, baked.vertices)
    assert [e[0] for e in inner.events] == ["mesh", "mesh", "progress"]      # every event passed on

    write_glb(baked, tmp_path / "model.glb")
    report = {"prompt": PROMPT, "files": {"model": "model.glb"}}
    config = build_config("smoke", {"prior.kind": "tiny"}, prompt=PROMPT)
    heard = []
    result = add_toy_quality(config, tmp_path, report, views=VIEWS, stage_meshes={"stage1": _big_sphere()},
                             log=heard.append)
    written = json.loads((tmp_path / "report.json").read_text())["toy_eval"]
    assert written["stages"]["stage1"]["area_ratio"] < 0.6 and written["normal_consistency"] > 0.99
    assert heard and "1 stage meshes" in heard[0]
    assert written["stages"]["stage1"]["r_precision"] is None       # stages: the measures without renders
    text = format_toy_quality(result)
    assert "normal consistency" in text and "\n  stage1: Chamfer" in text


def test_eval_cli_shows_the_measures_and_says_which_are_scale_free(baked, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "scale-free and yaw-free" in " ".join(capsys.readouterr().out.split())
    write_glb(_speckled(baked), tmp_path / "model.glb")
    (tmp_path / "report.json").write_text(json.dumps({"prompt": PROMPT}))
    assert main(["eval", str(tmp_path), "--views", str(VIEWS)]) == 0
    table = capsys.readouterr().out
    assert "NC~" in table and "area~" in table and "noise" in table
    row = json.loads((tmp_path / "eval.json").read_text())
    assert row["colour_noise"] > 5.0 and row["half_extent"] == pytest.approx(0.4, abs=1e-3)


def test_the_table_means_include_the_surface_measures(scorer, baked):
    rows = [dict(score_asset(m, PROMPT, scorer, views=VIEWS), asset=name)
            for name, m in (("clean", baked), ("rough", _big_sphere()))]
    lines = format_table(rows).splitlines()
    assert lines[-1].startswith("mean of 2 assets")
    mean_nc = (rows[0]["normal_consistency"] + rows[1]["normal_consistency"]) / 2
    assert f"{mean_nc:.3f}" in lines[-1]
