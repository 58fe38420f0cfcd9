"""Timestep schedules as data: which normalised time each iteration uses.

A plan is a list of :class:`StepInfo`, one per iteration, made up front from a seed, so that a
resumed job replays exactly the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import setting


@dataclass(frozen=True)
class StepInfo:
    """One iteration: the target's time ``t``, the next time of the schedule, the score model's time."""

    index: int
    t: float
    t_next: float
    t_score: float


@dataclass(frozen=True)
class TimestepSchedule:
    """How t is chosen per iteration.

    - ``decreasing``: a predetermined decreasing sequence ``t_start > ... > t_end`` with
      ``views_per_t`` iterations per timestep (APFO's ``l_i``); ``iterations // views_per_t`` steps
      give the timestep spacing ``(t_start - t_end) * 1000 / N`` in DDPM steps. ``curve`` bends the
      sequence (``linear`` in t; ``sqrt`` spends more iterations at low noise, FSD's t(tau) choice).
    - ``uniform``: ``t ~ U(t_end, t_start)`` fresh every iteration (SDS).
    - ``annealed``: uniform, with the upper bound lowered to ``anneal_t_max`` after
      ``anneal_after`` iterations (ProlificDreamer's VSD).
    The score model of the renders trains at ``t`` for decreasing schedules (APFO, Algorithm 1) and
    at an independent ``U(t_end, t_start)`` draw otherwise (VSD).
    """

    kind: Literal["decreasing", "uniform", "annealed"] = "decreasing"
    t_start: float = setting(1.0, 0.0, 1.0)
    t_end: float = setting(0.2, 0.0, 1.0)
    views_per_t: int = setting(5, 1, 64)
    curve: Literal["linear", "sqrt"] = "linear"
    anneal_after: int = setting(5000, 0, 1_000_000)
    anneal_t_max: float = setting(0.5, 0.0, 1.0)

    def __post_init__(self) -> None:
        if not (0.0 <= self.t_end <= self.t_start <= 1.0):
            raise ValueError(f"schedule needs 0 <= t_end <= t_start <= 1, got t_start={self.t_start}, t_end={self.t_end}")
        if self.views_per_t < 1:
            raise ValueError("views_per_t must be at least 1")

    def timesteps(self, iterations: int) -> int:
        """Number of distinct timesteps N a decreasing plan of ``iterations`` uses."""
        return max(1, iterations // self.views_per_t)

    def spacing(self, iterations: int) -> float:
        """Timestep spacing in DDPM steps (1000 per unit of t) for a decreasing plan."""
        return (self.t_start - self.t_end) * 1000.0 / self.timesteps(iterations)

    def plan(self, iterations: int, seed: int = 0) -> list[StepInfo]:
        """The per-iteration times for a run of ``iterations`` iterations."""
        if iterations < 1:
            raise ValueError("a schedule needs at least one iteration")
        g = torch.Generator().manual_seed(seed)
        if self.kind == "decreasing":
            n = self.timesteps(iterations)
            u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
            if self.curve == "sqrt":
                u = u.sqrt()
            ts = (self.t_start + (self.t_end - self.t_start) * u).tolist()
            plan = []
            for k in range(iterations):
                i = min(k // self.views_per_t, n - 1)
                plan.append(StepInfo(k, ts[i], ts[i + 1], ts[i]))
            return plan
        plan = []
        draws = torch.rand(iterations, 2, generator=g, dtype=torch.float64).tolist()
        for k, (a, b) in enumerate(draws):
            hi = self.t_start
            if self.kind == "annealed" and k >= self.anneal_after:
                hi = min(hi, self.anneal_t_max)
            t = self.t_end + (hi - self.t_end) * a
            t_score = self.t_end + (self.t_start - self.t_end) * b
            plan.append(StepInfo(k, t, t, t_score))
        return plan
