"""What every 3D stage does around the one optimisation loop: events, checkpoints, resume.

A stage (stage1.py, stage2.py, stage3.py) is an object with a ``name``, the ``config_attr`` of its
settings in :class:`~dreamflow.pipeline.config.JobConfig`, and ``build(ctx, incoming, models)``,
which returns a :class:`StageRun`: the stage's :class:`~dreamflow.methods.loop.Distillation`,
ready to step, with what the job streams about it and how it turns into the stage's typed result
(pipeline/handoff.py). :func:`run_stage` is how a job runs one; bench/iteration.py builds the same
objects and steps their loop.

:func:`run_stage_loop` reports the run in the job's event stream the same way for every stage:
``progress`` each step (with the loss and the gradient norm of the render, DreamFlow Fig. 6), a
``preview`` image and a live ``mesh`` every few steps, checkpoints for resume, and out-of-memory
fallbacks; :func:`run_stage` adds the final ``mesh`` and ``stage_done``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..export.mesh import MeshData, MeshError
from ..memory import MemoryLadder
from ..methods.loop import Distillation, LoopConfig, Problem, StepReport
from ..methods.registry import MethodConfig, build_method
from ..priors.base import Conditioning, Prior, ScoreModel
from ..scene.cameras import CameraSampler
from .components import build_score_model, get_prior, get_refiner, score_model_for
from .context import JobContext, ProgressTimer, StageRecord
from .handoff import StageResult
from .memory_plan import install_stage_fallback


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float image in [0, 1] -> (H, W, 3) uint8 for preview events and PNGs."""
    return (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def with_start(method: MethodConfig, start_t: float | None) -> MethodConfig:
    """The stage's method with its schedule starting no later than ``start_t`` (lower = closer to the input)."""
    if start_t is None:
        return method
    if not 0.0 < start_t <= 1.0:
        raise ValueError(f"start_t must lie in (0, 1], got {start_t}")
    sched = method.schedule
    t0 = min(sched.t_start, float(start_t))
    return replace(method, schedule=replace(sched, t_start=t0, t_end=min(sched.t_end, t0)))


@dataclass(frozen=True)
class StageModels:
    """The diffusion models a stage distils from, when the caller brings its own (the benchmark's
    real architectures with random weights); without, the stage takes the job's (components.py)."""

    prior: Prior
    phi_base: Prior | None = None   # D_phi's separate base UNet (the paper's SD 2.1-v), if any


def stage_models(ctx: JobContext, stage: str, method: MethodConfig, models: StageModels | None,
                 refiner: bool = False, view: Callable[[Prior], Prior] | None = None) -> tuple[Prior, ScoreModel, str]:
    """D_p, D_phi and D_phi's reported name for a stage: from the job's models (components.py), or
    on the caller's ``models``. ``refiner``: D_p is the refiner and D_phi a LoRA on its own UNet
    (stage 3); ``view``: what the stage shows the prior instead of the prior itself (2a's normal maps)."""
    if models is None:
        prior = get_refiner(ctx) if refiner else get_prior(ctx)
        prior = prior if view is None else view(prior)
        return (prior, *build_score_model(ctx, prior, method, stage, phi_model=not refiner))
    prior = models.prior if view is None else view(models.prior)
    return (prior, *score_model_for(ctx, prior, method, stage, None if refiner else models.phi_base))


@dataclass
class StageRun:
    """One stage, built and ready to step: its loop, what the job streams, and how it ends.

    ``preview()`` renders the preview view ((1, 3, H, W) in [0, 1]); ``mesh()`` is the stage's
    current mesh (box coordinates; the job sends it in the input's); ``finish(history)`` makes the
    stage's result (its final mesh and metrics, the typed hand-off to the next stage).
    """

    stage: str
    loop: Distillation
    ladder: MemoryLadder          # the out-of-memory savers; ``ladder.applied`` says what was needed
    score_name: str               # the D_phi that was built ("lora", "identity", ...), reported
    preview_every: int
    preview: Callable[[], torch.Tensor]
    mesh_every: int
    mesh: Callable[[], MeshData]
    finish: Callable[[list[StepReport]], StageResult]

    @property
    def problem(self) -> Problem:
        """The stage's 3D problem (what the loop optimises)."""
        return self.loop.problem


class Stage(Protocol):
    """A pipeline stage: builds its run from the previous stage's result."""

    name: str
    config_attr: str

    def build(self, ctx: JobContext, incoming: Any, models: StageModels | None = None) -> StageRun:
        """The stage's loop on ``incoming`` (the previous stage's result, or None for stage 1)."""
        ...


def make_run(ctx: JobContext, stage: str, cfg: Any, method: MethodConfig, problem: Problem, prior: Prior,
             score_model: ScoreModel, score_name: str, cond: Conditioning, camera_seed: int,
             preview: Callable[[], torch.Tensor], mesh: Callable[[], MeshData],
             finish: Callable[[list[StepReport]], StageResult]) -> StageRun:
    """A StageRun with the stage settings ``cfg`` (steps, views, cameras, preview and mesh intervals).

    Out-of-memory iterations are retried with the next memory saver (smaller ray chunks, VAE/UNet
    recomputation, VAE tiling) instead of failing the job (pipeline/memory_plan.py).
    """
    seed = ctx.config.seed
    sampler = CameraSampler(cfg.cameras, seed=camera_seed, device=ctx.device)
    loop = Distillation(problem, build_method(method, seed), prior, score_model, cond, sampler,
                        LoopConfig(cfg.steps, cfg.views_per_iteration, checkpoint_every=ctx.config.checkpoint_every),
                        seed=seed)
    ladder = install_stage_fallback(loop, lambda what, why: ctx.emit(
        "log", {"level": "warning", "stage": stage, "message": f"out of memory ({why}); retrying with {what}"}))
    return StageRun(stage, loop, ladder, score_name, cfg.preview_every, preview, cfg.mesh_every, mesh, finish)


def run_stage_loop(ctx: JobContext, run: StageRun) -> list[StepReport]:
    """Run one stage's distillation with its events, checkpoints and resume; the step history.

    A live mesh that cannot be made yet (an early field with no surface) is a warning, not a failure.
    """
    stage, loop = run.stage, run.loop
    saved = ctx.load_checkpoint(stage)
    if saved is not None:
        loop.load_state_dict(saved["loop"])
    total = len(loop.plan)
    timer = ProgressTimer(total, loop.state.iteration)

    def emit_preview(step: int) -> None:
        with torch.no_grad():
            ctx.emit("preview", {"stage": stage, "step": step}, {"image": to_uint8(run.preview()[0])})

    def on_step(r: StepReport) -> None:
        step = r.index + 1
        ctx.emit("progress", {"stage": stage, "step": step, "total": total, "loss": r.loss, "grad_norm": r.grad_norm,
                              "t": r.t, "elapsed": timer.elapsed(), "eta": timer.eta(step), **ctx.stage_position(stage)})
        if run.preview_every > 0 and step % run.preview_every == 0 and step < total:
            emit_preview(step)
        if run.mesh_every > 0 and step % run.mesh_every == 0 and step < total:
            try:
                live = ctx.output_mesh(run.mesh())
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


def run_stage(ctx: JobContext, stage: Stage, incoming: Any) -> StageResult:
    """Build and run one stage in a job: its events, its record in ``ctx.stages``, its result."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run = stage.build(ctx, incoming)
    history = run_stage_loop(ctx, run)
    result = run.finish(history)
    steps = len(history)
    ctx.emit("mesh", {"stage": stage.name, "step": steps, "final": True}, ctx.output_mesh(result.mesh).arrays())
    result.metrics["cpu_seconds"] = time.process_time() - cpu_start
    seconds = time.perf_counter() - start
    ctx.stages[stage.name] = StageRecord(seconds, result.metrics, history)
    ctx.emit("stage_done", {"stage": stage.name, "steps": steps, "seconds": seconds,
                            "report": {"metrics": result.metrics, "score_model": run.score_name}})
    return result
