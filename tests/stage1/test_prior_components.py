"""The job's priors come out of one place with the device's fast path applied, D_phi's separate
base (DreamFlow's SD 2.1-v next to SD 2.1-base) included."""

import torch

import dreamflow.fastpath as fastpath
from dreamflow.events import JobControl, RecordingSink
from dreamflow.pipeline.components import build_score_model, get_prior
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.priors.tiny import tiny_stable_diffusion


def test_separate_phi_base_gets_the_same_fast_path(tmp_path, monkeypatch):
    eps = tiny_stable_diffusion(tmp_path / "sd-base", "epsilon")
    v = tiny_stable_diffusion(tmp_path / "sd-v", "v_prediction")
    # channels-last is CUDA's default switch; asking for it here makes "applied" visible on CPU.
    monkeypatch.setattr(fastpath, "for_device", lambda device: fastpath.FastPath(channels_last=True))
    cfg = build_config("smoke", {"prior.kind": "stable-diffusion", "prior.model": str(eps), "prior.phi_model": str(v),
                                 "prior.local_files_only": True, "prior.dtype": "float32",
                                 "stage1.method.score_model": "lora"}, prompt="a chair")
    ctx = JobContext(cfg, tmp_path / "out", RecordingSink(), JobControl(), torch.device("cpu"))
    prior = get_prior(ctx)
    model, built = build_score_model(ctx, prior, cfg.stage1.method, "stage1")
    assert built == "lora" and model.base is ctx.cache["phi_base"] and model.base is not prior
    assert model.base.denoiser.prediction_type == "v_prediction" and model.base.vae is None
    for p in (prior, model.base):
        conv = p.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert build_score_model(ctx, prior, cfg.stage1.method, "texture")[0].base is model.base  # loaded once
