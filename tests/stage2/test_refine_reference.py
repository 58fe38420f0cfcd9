"""Refining an input mesh against the exact reference-object prior (the built-in house)."""

import numpy as np
import torch

from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.files import read_glb
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.components import reference_renderer
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.pipeline.job import run_job
from dreamflow.pipeline.metrics import chamfer_relative
from dreamflow.pipeline.metrics import evaluate_mesh as evaluate
from dreamflow.scene.reference_object import builtin_house


def _final_mesh(sink: RecordingSink, stage: str) -> dict:
    return [e[2] for e in sink.of_kind("mesh") if e[1]["stage"] == stage and e[1]["final"]][-1]


def test_texture_only_refinement_keeps_the_mesh_raises_psnr_and_round_trips_through_glb(tmp_path):
    house = builtin_house()
    grey = MeshData(house.vertices.copy(), house.faces.copy(), None, house.uvs.copy(),
                    np.full_like(house.texture, 128))
    cfg = build_config("preview", overrides={"texture.steps": 60, "texture.resolution": 48, "texture.mesh_every": 0,
                                             "refine.enabled": False, "export.texture_size": 128})
    ctx = JobContext(cfg, tmp_path, RecordingSink(), JobControl(), torch.device("cpu"))
    ctx.reference = reference_renderer(cfg, ctx.device)
    before = evaluate(ctx, grey)["psnr_db"]
    sink = RecordingSink()
    run_job(cfg, tmp_path / "out", sink, JobControl(), input_mesh=grey, start_stage="texture", start_t=0.5)
    out = _final_mesh(sink, "texture")
    assert np.array_equal(out["faces"], house.faces) and np.array_equal(out["vertices"], house.vertices)
    assert np.array_equal(out["uvs"], house.uvs)
    after = [e[1] for e in sink.of_kind("stage_done")][0]["report"]["metrics"]["psnr_db"]
    assert after > before + 5.0, (before, after)
    # The written asset reads back with the same geometry, UV layout and texture.
    back = read_glb(tmp_path / "out" / "model.glb")
    assert np.array_equal(back.faces, out["faces"])
    assert np.allclose(back.vertices, out["vertices"], atol=1e-6)
    assert np.allclose(back.uvs, out["uvs"], atol=1e-6)
    assert np.array_equal(back.texture, out["texture"])


def test_geometry_refinement_lowers_the_chamfer_distance_to_the_reference(tmp_path):
    house = builtin_house()
    squashed = house.vertices.copy()
    squashed[:, 2] = squashed[:, 2] * 0.75 - 0.02
    start = MeshData(squashed, house.faces.copy())
    before = chamfer_relative(start, house)
    cfg = build_config("preview", overrides={"geometry.steps": 60, "geometry.resolution": 64,
                                             "geometry.tet_resolution": 32, "geometry.mesh_every": 0,
                                             "texture.enabled": False, "refine.enabled": False,
                                             "export.texture_size": 128, "export.face_budget": 4000})
    sink = RecordingSink()
    result = run_job(cfg, tmp_path / "out", sink, JobControl(), input_mesh=start, start_stage="geometry")
    after = result.report["stages"]["geometry"]["metrics"]["chamfer_rel"]
    assert after < 0.85 * before, (before, after)
    out = _final_mesh(sink, "geometry")
    assert out["faces"].min() >= 0 and out["faces"].max() < len(out["vertices"])
