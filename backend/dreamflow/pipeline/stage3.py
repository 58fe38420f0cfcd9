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

from .components import build_score_model, get_refiner
from .context import JobContext
from .stage2 import run_colour_stage

REFINE = "refine"


def run_refine_stage(ctx: JobContext) -> None:
    """Stage 3 runner: refine the colour field on the fixed mesh with the refiner prior."""
    prior = get_refiner(ctx)
    cfg = ctx.config.refine
    # D_phi of stage 3 is a LoRA on the refiner's own UNet (the refiner is its base, not SD 2.1-v).
    score_model, score_name = build_score_model(ctx, prior, cfg.method, REFINE, phi_model=False)
    run_colour_stage(ctx, REFINE, cfg, prior, score_model, score_name, lr_geometry=cfg.lr_geometry)

