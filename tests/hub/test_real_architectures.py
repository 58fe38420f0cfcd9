"""The real SD 2.1 and SDXL-refiner architectures, random weights, through the normal loading path.

Tiny configs hide mistakes that only the real shapes show: cross-attention width 1024 (SD 2.1) and
1280 (refiner), per-level head dimensions, the refiner's pooled text embedding and its five time
ids. Each model is written as a diffusers folder (bench/arch.py's configs, bf16, random weights),
loaded through `load_diffusion_prior` like the published weights, and the pipeline runs two
iterations of stages 1, 2b and 3 at reduced resolution (32x32 latents). Only one of the two UNets
is alive at a time: stage 3 releases SD 2.1 before the refiner loads. They run in bf16 where the
CPU has bf16 instructions, else in float32 (emulated bf16 is ~70x slower: hours, not minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dreamflow.devices import cpu_has_native_bf16
from dreamflow.events import JobControl, RecordingSink
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job
from dreamflow.priors import loading

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from arch import parameter_count, save_random_pipeline  # noqa: E402


@pytest.mark.slow
def test_sd21_and_the_sdxl_refiner_at_their_real_shapes_run_stages_1_2b_and_3(tmp_path, monkeypatch):
    import torch

    sd21 = save_random_pipeline("sd21", tmp_path / "sd21", torch.bfloat16, prediction_type="epsilon")
    refiner = save_random_pipeline("sdxl-refiner", tmp_path / "refiner", torch.bfloat16)
    loaded = []
    real = loading.load_diffusion_prior

    def record(model, role, *args, **kwargs):
        prior = real(model, role, *args, **kwargs)
        unet = prior.unet.config
        loaded.append((role, type(prior).__name__, parameter_count(prior.unet), unet.cross_attention_dim,
                       prior.unet.dtype))
        return prior

    monkeypatch.setattr(loading, "load_diffusion_prior", record)
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    overrides = {
        "prior.model": str(sd21), "prior.phi_model": str(sd21), "prior.refiner_model": str(refiner),
        "prior.dtype": dtype, "prior.encode_size": 256,
        "stage1.steps": 2, "stage1.resolution": 32, "stage1.samples_per_ray": 16, "stage1.grid.levels": 4,
        "stage1.grid.log2_table_size": 12, "stage1.mesh_resolution": 32, "stage1.mesh_every": 2,
        "stage1.occupancy_resolution": 16,
        "geometry.enabled": False,
        "texture.steps": 2, "texture.resolution": 64, "texture.grid.levels": 4, "texture.grid.log2_table_size": 12,
        "texture.mesh_every": 2,
        "refine.steps": 2, "refine.resolution": 256, "refine.grid.levels": 4, "refine.grid.log2_table_size": 12,
        "refine.mesh_every": 2,
        "export.texture_size": 64, "export.face_budget": 2000, "export.view_resolution": 32,
    }
    sink = RecordingSink()
    result = run_job(build_config("paper", overrides, prompt="a red chair"), tmp_path / "out", sink, JobControl())
    assert [(r, c) for r, c, *_ in loaded] == [("prior", "StableDiffusionPrior"), ("refiner", "SdxlRefinerPrior")]
    (_, _, sd_params, sd_width, sd_dtype), (_, _, ref_params, ref_width, _) = loaded
    assert (round(sd_params / 1e6), sd_width, sd_dtype) == (866, 1024, getattr(torch, dtype))
    assert (round(ref_params / 1e6), ref_width) == (2260, 1280)
    assert list(result.report["stages"]) == ["stage1", "texture", "refine"]
    for stage in ("stage1", "texture", "refine"):
        losses = [e[1]["loss"] for e in sink.of_kind("progress") if e[1]["stage"] == stage]
        assert len(losses) == 2 and np.isfinite(losses).all(), (stage, losses)
