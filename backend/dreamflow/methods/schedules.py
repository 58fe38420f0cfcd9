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
      sequence (``linear`` in t; ``sqrt`` spends more iterations at low noise, FSD's t(tau) choice;
      ``dreamtime`` spends them in proportion to DreamTime's prior weight ``W_p(t)``, flat on
      DDPM steps 500..800 with Gaussian tails of width 300 above and 100 below).
      A plan that ends at ``t_end = 0`` lands its last step on sigma = 0 (targets.py).
    - ``uniform``: ``t ~ U(t_end, t_start)`` fresh every iteration (SDS).
    - ``annealed``: uniform, with the upper bound lowered to ``anneal_t_max`` once a fraction
      ``anneal_at`` of the run's iterations is done (ProlificDreamer's VSD: after 5k of 25k NeRF
      steps, a fraction 0.2, so a shorter run anneals at the same point of its course).
    The score model of the renders trains at ``t`` for decreasing schedules (APFO, Algorithm 1) and
    at an independent ``U(t_end, t_start)`` draw otherwise (VSD).
    """

    kind: Literal["decreasing", "uniform", "annealed"] = "decreasing"
    t_start: float = setting(1.0, 0.0, 1.0)
    t_end: float = setting(0.2, 0.0, 1.0)
    views_per_t: int = setting(5, 1, 64)
    curve: Literal["linear", "sqrt", "dreamtime"] = "linear"
    anneal_at: float = setting(0.2, 0.0, 1.0)
    anneal_t_max: float = setting(0.5, 0.0, 1.0)

    def __post_init__(self) -> None:
        if not (0.0 <= self.t_end <= self.t_start <= 1.0):
            raise ValueError(f"schedule needs 0 <= t_end <= t_start <= 1, got t_start={self.t_start}, t_end={self.t_end}")
        if self.views_per_t < 1:
            raise ValueError("views_per_t must be at least 1")
        if not 0.0 <= self.anneal_at <= 1.0:
            raise ValueError(f"anneal_at is a fraction of the run in [0, 1], got {self.anneal_at}")

    def anneal_after(self, iterations: int) -> int:
        """The iteration from which an annealed plan draws from the lowered range."""
        return round(self.anneal_at * iterations)

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
            if self.curve == "dreamtime":
                ts = dreamtime_times(self.t_start, self.t_end, u).tolist()
            else:
                ts = (self.t_start + (self.t_end - self.t_start) * u).tolist()
            plan = []
            for k in range(iterations):
                i = min(k // self.views_per_t, n - 1)
                plan.append(StepInfo(k, ts[i], ts[i + 1], ts[i]))
            return plan
        plan = []
        draws = torch.rand(iterations, 2, generator=g, dtype=torch.float64).tolist()
        anneal_after = self.anneal_after(iterations)
        for k, (a, b) in enumerate(draws):
            hi = self.t_start
            if self.kind == "annealed" and k >= anneal_after:
                hi = max(min(hi, self.anneal_t_max), self.t_end)  # a range above the bound stays put
            t = self.t_end + (hi - self.t_end) * a
            t_score = self.t_end + (self.t_start - self.t_end) * b
            plan.append(StepInfo(k, t, t, t_score))
        return plan


def dreamtime_weight(step: torch.Tensor, m1: float = 800.0, m2: float = 500.0, s1: float = 300.0,
                     s2: float = 100.0) -> torch.Tensor:
    """DreamTime's prior weight ``W_p`` over DDPM steps (Huang et al. 2023, TP-SDS): 1 on
    ``[m2, m1]``, Gaussian tails of width ``s1`` above and ``s2`` below."""
    above = torch.exp(-((step - m1) ** 2) / (2.0 * s1 * s1))
    below = torch.exp(-((step - m2) ** 2) / (2.0 * s2 * s2))
    return torch.where(step > m1, above, torch.where(step < m2, below, torch.ones_like(step)))


def dreamtime_times(t_start: float, t_end: float, u: torch.Tensor) -> torch.Tensor:
    """Times at optimisation progress ``u`` in [0, 1]: the ``t`` whose weight above it, from
    ``t_start`` down, is the fraction ``u`` of the total (DreamTime's monotone ``t(i)``)."""
    steps = torch.linspace(t_start * 1000.0, t_end * 1000.0, 2001, dtype=torch.float64)
    w = dreamtime_weight(steps)
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((w[1:] + w[:-1]) / 2.0, 0)])
    mass = mass / mass[-1]
    idx = torch.searchsorted(mass, u.clamp(0.0, 1.0)).clamp(1, len(steps) - 1)
    lo, hi = mass[idx - 1], mass[idx]
    frac = ((u - lo) / (hi - lo).clamp(min=1e-300)).clamp(0.0, 1.0)
    return (steps[idx - 1] + frac * (steps[idx] - steps[idx - 1])) / 1000.0
