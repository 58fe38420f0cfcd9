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


#: The pipeline's stages, as method_defaults knows them ("image" is the 2D experiment).
StageRole = Literal["nerf", "geometry", "texture", "refine", "image"]

#: ProlificDreamer's steps per stage (Appendix F: NeRF 25k, geometry 15k, texture 30k), each
#: annealing t's range after its first 5k: the fraction of a stage at which VSD anneals.
PROLIFICDREAMER_ANNEAL_AT: dict[str, float] = {"nerf": 5000 / 25000, "geometry": 5000 / 15000,
                                               "texture": 5000 / 30000}
#: The baselines' timestep range (DreamFusion, ProlificDreamer: U(0.02, 0.98)).
BASELINE_T_RANGE = (0.02, 0.98)


@dataclass(frozen=True)
class MethodConfig:
    """One stage's method settings. ``score_model``: which D_phi the stage builds for it.

    ``lora_lr`` and ``camera_embedding`` override the prior's LoRA settings for this stage
    (None: ``PriorConfig.lora_lr`` / ``camera_embedding``); VSD sets ProlificDreamer's.
    """

    name: MethodName = "apfo"
    schedule: TimestepSchedule = TimestepSchedule()
    guidance: float = setting(7.5, 0.0, 1000.0)                # diffusers form: D_u + guidance * (D_c - D_u)
    score_model: Literal["lora", "identity", "exact"] = "lora"
    fsd_beta: float = setting(1.0, 0.0, 10.0)                # FSD: weight of the world-map noise against fresh noise
    fsd_map_scale: float = setting(2.0, 1.0, 16.0)           # FSD: world-map size relative to one view's noise map
    sds_scale: float = setting(1.0, 0.0, 1000.0)               # SDS/VSD/FSD: multiplier on w(t)/sigma
    lora_lr: float | None = setting(None, 1e-7, 1.0)   # None: the prior's LoRA learning rate
    camera_embedding: bool | None = None  # None: the prior's camera-embedding switch


def method_defaults(name: str, stage: MethodConfig, role: StageRole = "nerf") -> MethodConfig:
    """Settings of method ``name`` for a stage (``role``) whose APFO settings are ``stage``.

    APFO keeps the stage's decreasing schedule. The baselines follow their papers in every stage
    they had (README, "The baselines, stage by stage", lists each value and each deviation):

    - SDS (DreamFusion; Magic3D for the mesh): ``t ~ U(0.02, 0.98)``, guidance 100, ``D_phi = x``.
    - VSD (ProlificDreamer): ``t ~ U(0.02, 0.98)`` annealed to ``U(0.02, 0.5)`` at the paper's
      fraction of each stage (5k of 25k NeRF / 30k texture steps), guidance 7.5, a LoRA ``D_phi``
      with learning rate 1e-4 and the camera embedding; its geometry stage is SDS, as the paper's.
    - FSD: ``t`` decreasing along a sqrt curve over the same range, world-map noise, guidance 7.5,
      ``D_phi = x``.

    In the 2D experiment (``role="image"``) VSD draws t without annealing, as ProlificDreamer's
    Appendix G; in the refinement stage, whose range ends below the annealed bound, neither. The refinement stage (SDXL refiner, 0.3 -> 0) has no counterpart in the baselines' papers:
    they run their rule there with ``t`` limited to the stage's own range.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    if name == "apfo":
        return replace(stage, name="apfo")
    lo, hi = BASELINE_T_RANGE
    if role == "refine":
        hi = min(hi, stage.schedule.t_start)
    base = replace(stage, sds_scale=1.0, lora_lr=None, camera_embedding=None)
    if name == "sds" or (name == "vsd" and role == "geometry"):
        return replace(base, name="sds", guidance=100.0, score_model="identity",
                       schedule=replace(stage.schedule, kind="uniform", t_start=hi, t_end=lo) if name == "sds"
                       else replace(stage.schedule, kind="annealed", t_start=hi, t_end=lo, anneal_t_max=0.5,
                                    anneal_at=PROLIFICDREAMER_ANNEAL_AT["geometry"]))
    if name == "vsd":
        # D_phi: the stage's own learned model (the "exact" one in CPU presets), a LoRA by default.
        model = stage.score_model if stage.score_model != "identity" else "lora"
        return replace(base, name="vsd", guidance=7.5, score_model=model, lora_lr=1e-4, camera_embedding=True,
                       # ProlificDreamer's 2D experiment (Appendix G) does not anneal.
                       schedule=replace(stage.schedule, kind="uniform" if role in ("image", "refine") else "annealed",
                                        t_start=hi, t_end=lo,
                                        anneal_at=PROLIFICDREAMER_ANNEAL_AT.get(role, PROLIFICDREAMER_ANNEAL_AT["texture"]),
                                        anneal_t_max=0.5))
    return replace(base, name="fsd", guidance=7.5, score_model="identity",
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
