"""What every 3D stage does around the one optimisation loop: events, checkpoints, resume.

Each stage builds its own problem, prior and score model; this runs them through
:class:`~dreamflow.methods.loop.Distillation` and reports the run in the job's event stream the
same way for every stage: ``progress`` each step (with the loss and the gradient norm of the render,
DreamFlow Fig. 6), a ``preview`` image and a live ``mesh`` every few steps, checkpoints for resume,
and out-of-memory fallbacks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..export.mesh import MeshData, MeshError
from ..methods.loop import Distillation, LoopConfig, Problem, StepReport
from ..methods.registry import MethodConfig, build_method
from ..priors.base import Conditioning, Prior, ScoreModel
from ..scene.cameras import CameraRanges, CameraSampler
from .context import JobContext, ProgressTimer


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float image in [0, 1] -> (H, W, 3) uint8 for preview events and PNGs."""
    return (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def run_stage_loop(ctx: JobContext, stage: str, problem: Problem, method_cfg: MethodConfig, steps: int, views: int,
                   prior: Prior, score_model: ScoreModel, cond: Conditioning, ranges: CameraRanges, camera_seed: int,
                   preview_every: int, preview: Callable[[], torch.Tensor],
                   mesh_every: int, mesh: Callable[[], MeshData]) -> list[StepReport]:
    """Run one stage's distillation with its events, checkpoints and resume; the step history.

    ``preview()`` renders the preview view ((1, 3, H, W) in [0, 1]); ``mesh()`` is the stage's current
    mesh as the job sends it. A live mesh that cannot be made yet (an early field with no surface)
    is a warning, not a failure.
    """
    seed = ctx.config.seed
    sampler = CameraSampler(ranges, seed=camera_seed, device=ctx.device)
    loop = Distillation(problem, build_method(method_cfg, seed), prior, score_model, cond, sampler,
                        LoopConfig(steps, views, checkpoint_every=ctx.config.checkpoint_every), seed=seed)
    # Out-of-memory iterations are retried with the next memory saver (smaller ray chunks, VAE/UNet
    # recomputation, VAE tiling) instead of failing the job (pipeline/memory_plan.py, which imports
    # the stage modules, hence the late import).
    from .memory_plan import install_stage_fallback

    install_stage_fallback(loop, lambda what, why: ctx.emit(
        "log", {"level": "warning", "stage": stage, "message": f"out of memory ({why}); retrying with {what}"}))
    saved = ctx.load_checkpoint(stage)
    if saved is not None:
        loop.load_state_dict(saved["loop"])
    total = len(loop.plan)
    timer = ProgressTimer(total, loop.state.iteration)

    def emit_preview(step: int) -> None:
        with torch.no_grad():
            ctx.emit("preview", {"stage": stage, "step": step}, {"image": to_uint8(preview()[0])})

    def on_step(r: StepReport) -> None:
        step = r.index + 1
        ctx.emit("progress", {"stage": stage, "step": step, "total": total, "loss": r.loss, "grad_norm": r.grad_norm,
                              "t": r.t, "elapsed": timer.elapsed(), "eta": timer.eta(step), **ctx.stage_position(stage)})
        if preview_every > 0 and step % preview_every == 0 and step < total:
            emit_preview(step)
        if mesh_every > 0 and step % mesh_every == 0 and step < total:
            try:
                live = mesh()
            except MeshError as exc:
                ctx.emit("log", {"level": "warning", "stage": stage, "message": f"no intermediate mesh at step {step}: {exc}"})
            else:
                ctx.emit("mesh", {"stage": stage, "step": step, "final": False}, live.arrays())

    def checkpoint(state: dict) -> None:
        ctx.save_checkpoint(stage, {"stage": stage, "loop": state})

    history = loop.run(on_step, ctx.control, checkpoint)
    ctx.save_checkpoint(stage, {"stage": stage, "loop": loop.state_dict()})
    emit_preview(total)
    return list(history)
