"""Stages 2a, 2b and 3 end to end with tiny random Stable Diffusion and SDXL-refiner pipelines:
the same loading, LoRA, guidance and VAE code paths as the real models, a few steps each."""

import numpy as np
import trimesh

from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job


def test_geometry_texture_and_refine_run_on_tiny_diffusion_priors(tmp_path):
    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    mesh = MeshData(np.asarray(ico.vertices, np.float32), np.asarray(ico.faces, np.int32))
    cfg = build_config("smoke", overrides={"prior.kind": "tiny", "geometry.steps": 2, "texture.steps": 2,
                                           "refine.steps": 2, "geometry.tet_resolution": 12,
                                           "texture.method.score_model": "lora", "refine.method.score_model": "lora"},
                       prompt="a small stone", seed=3)
    sink = RecordingSink()
    result = run_job(cfg, tmp_path / "out", sink, JobControl(), input_mesh=mesh, start_stage="geometry",
                     checkpoint_dir=tmp_path / "ckpt")
    done = {e[1]["stage"]: e[1] for e in sink.of_kind("stage_done")}
    assert list(done) == ["geometry", "texture", "refine"]
    assert done["geometry"]["report"]["score_model"] == "identity"
    assert done["texture"]["report"]["score_model"] == "lora"
    assert done["refine"]["report"]["score_model"] == "lora"
    for stage in done:
        losses = [e[1]["loss"] for e in sink.of_kind("progress") if e[1]["stage"] == stage]
        assert len(losses) == 2 and all(np.isfinite(losses))
        finals = [e for e in sink.of_kind("mesh") if e[1]["stage"] == stage and e[1]["final"]]
        assert len(finals) == 1
        arrays = finals[0][2]
        assert arrays["texture"].dtype == np.uint8 and arrays["uvs"].shape == (len(arrays["vertices"]), 2)
        assert arrays["faces"].max() < len(arrays["vertices"])
    # Stage 3 keeps the mesh of stage 2 (no remeshing after 2a).
    tex_mesh = [e[2] for e in sink.of_kind("mesh") if e[1]["stage"] == "texture" and e[1]["final"]][0]
    ref_mesh = [e[2] for e in sink.of_kind("mesh") if e[1]["stage"] == "refine" and e[1]["final"]][0]
    assert np.array_equal(tex_mesh["faces"], ref_mesh["faces"])
    assert np.array_equal(tex_mesh["vertices"], ref_mesh["vertices"])
    assert (tmp_path / "out" / "model.glb").is_file()
    assert result.report["stages"].keys() == {"geometry", "texture", "refine"}
