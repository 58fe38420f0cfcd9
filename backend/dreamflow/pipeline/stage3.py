"""Stage 3: high-resolution refinement of the textured mesh with the SDXL refiner.

DreamFlow refines at 1024x1024 with the SDXL refiner as both the pretrained prior ``D_p`` and the
base of the score model ``D_phi`` (a LoRA adapter on the refiner's own UNet), t 0.3 -> 0.0 with
timestep spacing 10 (300 steps = 30 timesteps x 10 views). It is the colour stage of 2b run again
with the refine settings (same problem, same loop: mesh_stage.ColourStage), on the same fixed
mesh, so the artist's topology survives. On CUDA the refiner runs in half precision where its config allows (the SDXL
VAE asks to stay in float32) with VAE slicing and tiling, which keep a 1024x1024 encode with
gradients inside a consumer GPU. With the reference-object prior it runs at the preset's
resolution against the exact denoiser.
"""

from __future__ import annotations

from .config import RefineStageConfig
from .context import JobContext
from .handoff import MeshStageInput, SurfaceResult
from .mesh_stage import ColourStage
from .stage_loop import run_stage

REFINE = "refine"


class RefineStage(ColourStage):
    """Stage 3: refine the colour field on the fixed mesh with the refiner prior (vertices may move
    by ``lr_geometry``); takes 2b's SurfaceResult (or 2a's, stage 1's, the input's), returns one."""

    name = REFINE
    config_attr = "refine"
    refiner = True   # D_p is the refiner; D_phi a LoRA on the refiner's own UNet (not on SD 2.1-v)

    def lr_geometry(self, cfg: RefineStageConfig) -> float:
        """Stage 3 may move vertices a little."""
        return cfg.lr_geometry


REFINE_STAGE = RefineStage()


def run_refine_stage(ctx: JobContext, incoming: MeshStageInput) -> SurfaceResult:
    """Stage 3 in a job: its events and record; the refined surface."""
    return run_stage(ctx, REFINE_STAGE, incoming)
