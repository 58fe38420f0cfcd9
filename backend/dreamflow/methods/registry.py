"""Build a :class:`Method` from typed settings; the only place that maps names to parts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..config import setting

from .loop import Method
from .noise import FreshNoise, NoiseSource
from .schedules import TimestepSchedule
from .targets import ApfoTarget, ScoreDistillationTarget

MethodName = Literal["apfo", "vsd", "sds", "fsd"]
METHOD_NAMES: tuple[str, ...] = ("apfo", "vsd", "sds", "fsd")


@dataclass(frozen=True)
class MethodConfig:
    """One stage's method settings. ``score_model``: which D_phi the stage builds for it."""

    name: MethodName = "apfo"
    schedule: TimestepSchedule = TimestepSchedule()
    guidance: float = setting(7.5, 0.0, 1000.0)                # diffusers form: D_u + guidance * (D_c - D_u)
    score_model: Literal["lora", "identity", "exact"] = "lora"
    fsd_beta: float = setting(1.0, 0.0, 10.0)                # FSD: weight of the world-map noise against fresh noise
    fsd_map_scale: float = setting(2.0, 1.0, 16.0)           # FSD: world-map size relative to one view's noise map
    sds_scale: float = setting(1.0, 0.0, 1000.0)               # SDS/VSD/FSD: multiplier on w(t)/sigma


def method_defaults(name: str, stage: MethodConfig) -> MethodConfig:
    """Settings of method ``name`` for a stage whose APFO settings are ``stage``.

    APFO keeps the stage's decreasing schedule. The baselines follow their papers: SDS draws
    ``t ~ U(0.02, 0.98)`` with guidance 100 and no learned D_phi; VSD draws the same range,
    annealed to 0.5 after 5000 steps, with a LoRA D_phi and guidance 7.5; FSD decreases t along a
    sqrt curve with world-map noise and no learned D_phi. A later stage (which starts from a
    finished shape) clips the baselines' range to the stage's own ``t_start``.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    hi = min(0.98, stage.schedule.t_start)
    lo = min(0.02, stage.schedule.t_end)
    keep_lr_model = stage.score_model if stage.score_model != "identity" else "lora"
    if name == "apfo":
        return replace(stage, name="apfo")
    if name == "sds":
        return replace(stage, name="sds", guidance=100.0, score_model="identity",
                       schedule=replace(stage.schedule, kind="uniform", t_start=hi, t_end=lo))
    if name == "vsd":
        return replace(stage, name="vsd", guidance=7.5, score_model=keep_lr_model,
                       schedule=replace(stage.schedule, kind="annealed", t_start=hi, t_end=lo))
    return replace(stage, name="fsd", guidance=7.5, score_model="identity",
                   schedule=replace(stage.schedule, kind="decreasing", curve="sqrt", t_start=hi, t_end=lo))


def build_method(cfg: MethodConfig, seed: int = 0) -> Method:
    """The method object for these settings."""
    noise: NoiseSource
    if cfg.name == "fsd":
        from .noise import WorldMapNoise

        noise = WorldMapNoise(beta=cfg.fsd_beta, map_scale=cfg.fsd_map_scale, seed=seed)
    else:
        noise = FreshNoise()
    rule = ApfoTarget() if cfg.name == "apfo" else ScoreDistillationTarget(cfg.sds_scale)
    return Method(cfg.name, rule, cfg.schedule, noise)
