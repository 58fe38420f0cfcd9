"""Stage 3: high-resolution refinement of the textured mesh with the SDXL refiner.

DreamFlow refines at 1024x1024 with the SDXL refiner as both the pretrained prior ``D_p`` and the
base of the score model ``D_phi`` (a LoRA adapter on the refiner's own UNet), t 0.3 -> 0.0 with
timestep spacing 10 (300 steps = 30 timesteps x 10 views). It is the colour stage of 2b run again
with the refine settings (same problem, same loop), on the same fixed mesh, so the artist's
topology survives. On CUDA the refiner runs in half precision where its config allows (the SDXL
VAE asks to stay in float32) with VAE slicing and tiling, which keep a 1024x1024 encode with
gradients inside a consumer GPU. With the reference-object prior it runs at the preset's
resolution against the exact denoiser.
"""

from __future__ import annotations

import torch

from ..priors.base import Prior, ScoreModel
from .components import build_score_model, get_prior, lora_settings
from .context import JobContext
from .stage2 import run_colour_stage

REFINE = "refine"


def enable_memory_savers(prior: Prior, device: torch.device) -> list[str]:
    """VAE slicing and tiling on CUDA (a 1024x1024 encode with gradients); names of what was enabled."""
    enabled: list[str] = []
    vae = getattr(prior, "vae", None)
    if vae is None or device.type != "cuda":
        return enabled
    for name in ("enable_slicing", "enable_tiling"):
        fn = getattr(vae, name, None)
        if callable(fn):
            fn()
            enabled.append(name)
    return enabled


def refiner_prior(ctx: JobContext) -> Prior:
    """D_p of stage 3: the SDXL refiner (tiny random for ``tiny``), or the job's exact reference prior."""
    cfg = ctx.config.prior
    if cfg.kind == "reference":
        return get_prior(ctx)
    if "refiner" in ctx.cache:
        return ctx.cache["refiner"]
    from ..priors.sdxl_refiner import SdxlRefinerPrior

    if cfg.kind == "tiny":
        from ..priors.tiny import tiny_sdxl_refiner

        base = ctx.checkpoint_dir if ctx.checkpoint_dir is not None else ctx.out_dir / ".cache"
        folder = tiny_sdxl_refiner(base / "tiny-sdxl-refiner", seed=ctx.config.seed)
        prior = SdxlRefinerPrior.from_pretrained(str(folder), device=ctx.device, dtype="float32", local_files_only=True)
    else:
        prior = SdxlRefinerPrior.from_pretrained(cfg.refiner_model, device=ctx.device, dtype=cfg.dtype,
                                                 local_files_only=cfg.local_files_only)
    enable_memory_savers(prior, ctx.device)
    from ..fastpath import apply_fast_path, for_device

    apply_fast_path(prior, for_device(ctx.device), ctx.device)  # SDPA; on CUDA also NHWC, encoder offload
    ctx.cache["refiner"] = prior
    return prior


def refiner_score_model(ctx: JobContext, prior: Prior) -> tuple[ScoreModel, str]:
    """D_phi of stage 3: a LoRA on the refiner's own UNet (the refiner is its base, not SD 2.1-v)."""
    method = ctx.config.refine.method
    if not prior.is_latent or method.score_model != "lora":
        return build_score_model(ctx, prior, method, REFINE)
    from ..priors.score_models import LoraScoreModel

    lr, camera = lora_settings(ctx, method)
    model = LoraScoreModel(prior, rank=ctx.config.prior.lora_rank, lr=lr, camera_embedding=camera,
                           seed=ctx.config.seed, adapter_name=f"dreamflow_phi_{REFINE}")
    return model, "lora"


def run_refine_stage(ctx: JobContext) -> None:
    """Stage 3 runner: refine the colour field on the fixed mesh with the refiner prior."""
    prior = refiner_prior(ctx)
    score_model, score_name = refiner_score_model(ctx, prior)
    cfg = ctx.config.refine
    run_colour_stage(ctx, REFINE, cfg, prior, score_model, score_name, lr_geometry=cfg.lr_geometry)

