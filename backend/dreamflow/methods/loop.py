"""The optimisation loop, written once: render, train D_phi, build the target, regress onto it.

It knows no method by name. A :class:`Method` is data: a target rule, a timestep schedule and a
noise source; the score model and the prior are passed in. The loop also owns the things every
long job needs: cancellation once per step, periodic checkpoints for resume, and rollback to the
last good state (with a lower learning rate) when the loss or the parameters stop being finite.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ..events import JobControl
from ..priors.base import Conditioning, Prior, ScoreModel
from ..scene.cameras import Cameras, CameraSampler
from .noise import NoiseSource
from .schedules import StepInfo, TimestepSchedule
from .targets import TargetContext, TargetRule


class NumericalDivergence(RuntimeError):
    """The optimisation kept producing NaN/inf after every allowed rollback."""


@dataclass
class Method:
    """A distillation method: which target, at which times, with which noise."""

    name: str
    rule: TargetRule
    schedule: TimestepSchedule
    noise: NoiseSource


@dataclass
class Rendered:
    """A differentiable render of a batch of cameras."""

    image: torch.Tensor                      # (B, 3, H, W) in [0, 1]
    alpha: torch.Tensor | None = None        # (B, 1, H, W) opacity, when the renderer has one
    regulariser: torch.Tensor | None = None  # scalar, already weighted (orientation, Laplacian, ...)


class Problem(ABC):
    """What the loop optimises: parameter groups and a differentiable render of cameras."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (each with its own ``lr``)."""

    @abstractmethod
    def render(self, cameras: Cameras | None) -> Rendered:
        """Render the cameras (``None`` for problems without cameras, e.g. 2D particles)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Parameters (and buffers) for checkpoints and rollback."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    def after_step(self, index: int) -> None:
        """Hook after each optimiser step (occupancy-grid refresh and the like)."""


@dataclass(frozen=True)
class LoopConfig:
    """Loop settings that are not the method's."""

    iterations: int
    views_per_iteration: int = 1
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # 0 disables clipping of the parameter gradient norm
    snapshot_every: int = 25        # in-memory last-good state for NaN rollback
    max_rollbacks: int = 3
    lr_backoff: float = 0.5
    checkpoint_every: int = 0       # 0: never call the checkpoint callback
    # "sgd" with lr = batch size moves each render exactly onto its target (2D particle mode:
    # the method's update rule itself, no optimiser dynamics); "adamw" is the papers' choice.
    optimiser: Literal["adamw", "sgd"] = "adamw"


@dataclass
class StepReport:
    """What one iteration did (logged, streamed as progress, plotted as DreamFlow Fig. 6)."""

    index: int
    total: int
    t: float
    sigma: float
    loss: float
    grad_norm: float
    score_loss: float
    seconds: float
    rollbacks: int = 0


@dataclass
class LoopState:
    """Everything the loop needs to continue later from ``iteration``."""

    iteration: int = 0
    rollbacks: int = 0
    history: list[StepReport] = field(default_factory=list)


class Distillation:
    """Runs a method on a problem against a prior and a score model of its renders."""

    def __init__(self, problem: Problem, method: Method, prior: Prior, score_model: ScoreModel,
                 cond: Conditioning, cameras: CameraSampler | None, config: LoopConfig, seed: int = 0):
        self.problem = problem
        self.method = method
        self.prior = prior
        self.score_model = score_model
        self.cond = cond
        self.cameras = cameras
        self.config = config
        self.plan: list[StepInfo] = method.schedule.plan(config.iterations, seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        if config.optimiser == "sgd":
            self.optimiser: torch.optim.Optimizer = torch.optim.SGD(problem.param_groups(),
                                                                    weight_decay=config.weight_decay)
        else:
            self.optimiser = torch.optim.AdamW(problem.param_groups(), betas=(0.9, 0.99), eps=1e-15,
                                               weight_decay=config.weight_decay)
        self.state = LoopState()
        self._good: dict | None = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Full state for a checkpoint: a resumed run continues where this one was, bit for bit on a
        CPU (on a GPU, gradients accumulated with atomics make it equal up to rounding)."""
        return {
            "iteration": self.state.iteration,
            "rollbacks": self.state.rollbacks,
            "history": [vars(r).copy() for r in self.state.history],
            "problem": self.problem.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "score_model": self.score_model.state_dict(),
            "noise": self.method.noise.state_dict(),
            "cameras": self.cameras.state_dict() if self.cameras is not None else None,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint made by state_dict()."""
        self.state.iteration = int(state["iteration"])
        self.state.rollbacks = int(state.get("rollbacks", 0))
        self.state.history = [StepReport(**r) for r in state.get("history", [])]
        self.problem.load_state_dict(state["problem"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.score_model.load_state_dict(state["score_model"])
        self.method.noise.load_state_dict(state["noise"])
        if self.cameras is not None and state.get("cameras") is not None:
            self.cameras.load_state_dict(state["cameras"])
        self.generator.set_state(state["generator"])

    def _snapshot(self) -> None:
        self._good = copy.deepcopy({
            "iteration": self.state.iteration,
            "problem": self.problem.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "score_model": self.score_model.state_dict(),
        })

    def _rollback(self, why: str) -> None:
        self.state.rollbacks += 1
        if self.state.rollbacks > self.config.max_rollbacks or self._good is None:
            raise NumericalDivergence(
                f"optimisation diverged ({why}) at iteration {self.state.iteration} after "
                f"{self.state.rollbacks - 1} rollbacks with lowered learning rates; no result was exported")
        good = copy.deepcopy(self._good)
        # The snapshot's optimiser state carries the learning rates of its time; keep lowering the
        # current ones instead, so repeated rollbacks back off further (lr * backoff^n).
        lowered = [group["lr"] * self.config.lr_backoff for group in self.optimiser.param_groups]
        self.problem.load_state_dict(good["problem"])
        self.optimiser.load_state_dict(good["optimiser"])
        self.score_model.load_state_dict(good["score_model"])
        for group, lr in zip(self.optimiser.param_groups, lowered):
            group["lr"] = lr
        self.state.iteration = good["iteration"]
        del self.state.history[good["iteration"]:]  # the undone steps are run again; history[i] is step i

    # -- the loop ----------------------------------------------------------------------------
    def step(self, info: StepInfo) -> StepReport:
        """One iteration: render, update D_phi, target, regress."""
        start = time.perf_counter()
        cams = self.cameras.sample(self.config.views_per_iteration) if self.cameras is not None else None
        out = self.problem.render(cams)
        x = self.prior.encode(out.image)
        score_loss = 0.0
        if self.score_model.trainable:
            score_loss = self.score_model.update(x.detach(), self.prior.sigma(info.t_score), self.cond, cams)
        ctx = TargetContext(self.prior, self.score_model, self.cond, cams, self.method.noise,
                            out.alpha, self.generator)
        result = self.method.rule(x.detach(), info, ctx)
        diff = x - result.target
        batch = x.shape[0]
        loss = 0.5 * diff.pow(2).sum() / batch
        total = loss if out.regulariser is None else loss + out.regulariser
        self.optimiser.zero_grad(set_to_none=True)
        # A view that sees none of the object (a flat mesh edge-on, a camera past a thin part)
        # renders only background: its gradient on the parameters is zero, so there is nothing to
        # step, and backward() on a graph-less tensor would raise.
        if total.requires_grad:
            total.backward()
        # The step's one read from the device, after its backward is queued: a read earlier in
        # the step would leave the GPU idle while Python launches what follows.
        logged = [diff.detach().flatten(1).norm(dim=1).mean(), total.detach()]
        if isinstance(score_loss, torch.Tensor):
            logged.append(score_loss.to(logged[0]))
        values = torch.stack(logged).tolist()
        grad_norm, loss_value = values[0], values[1]
        score_loss = values[2] if len(values) > 2 else score_loss
        if total.requires_grad and math.isfinite(loss_value):
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimiser.param_groups for p in g["params"]],
                                               self.config.grad_clip)
            self.optimiser.step()
            self.problem.after_step(info.index)
        return StepReport(info.index, len(self.plan), info.t, result.sigma, loss_value, grad_norm,
                          float(score_loss), time.perf_counter() - start, self.state.rollbacks)

    def _params_finite(self) -> bool:
        # One device read for all parameters (a read per tensor would sync once each).
        checks = [torch.isfinite(p).all() for g in self.optimiser.param_groups for p in g["params"]]
        return bool(torch.stack(checks).all()) if checks else True

    def run(self, on_step: Callable[[StepReport], None] | None = None, control: JobControl | None = None,
            checkpoint: Callable[[dict], None] | None = None) -> list[StepReport]:
        """Run (or continue) the plan to its end; returns the per-step history."""
        cfg = self.config
        while self.state.iteration < len(self.plan):
            if control is not None:
                control.check()
            k = self.state.iteration
            if self._good is None or (cfg.snapshot_every > 0 and k % cfg.snapshot_every == 0 and k != self._good["iteration"]):
                self._snapshot()
            report = self.step(self.plan[k])
            if not math.isfinite(report.loss) or not self._params_finite():
                self._rollback("non-finite loss" if not math.isfinite(report.loss) else "non-finite parameters")
                continue
            self.state.iteration = k + 1
            self.state.history.append(report)
            if on_step is not None:
                on_step(report)
            if checkpoint is not None and cfg.checkpoint_every > 0 and self.state.iteration % cfg.checkpoint_every == 0:
                checkpoint(self.state_dict())
        return self.state.history
