"""Which diffusion models a job needs, and where each one stands on this machine.

One list, read by the pipeline's loaders' callers and by ``dreamflow models``: the prior ``D_p``
of stages 1-2 (``prior.model``), the separate base of ``D_phi`` when a stage trains a LoRA and
``prior.phi_model`` differs from ``prior.model``, and stage 3's refiner (``prior.refiner_model``)
when stage 3 runs and it is another model. The reference and tiny priors need none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..priors.hub import DEFAULT_REVISION, ModelFiles, PriorLoadError, locate, variant_for_dtype
from .config import JobConfig


@dataclass(frozen=True)
class ModelNeed:
    """One model a job loads: its role, its name (id or folder), the stages that use it and its Hub revision."""

    role: str
    model: str
    stages: tuple[str, ...]
    revision: str = DEFAULT_REVISION


@dataclass(frozen=True)
class ModelState:
    """Where a needed model stands: located files, or the one-line reason it cannot be loaded."""

    need: ModelNeed
    files: ModelFiles | None
    problem: str | None

    @property
    def status(self) -> str:
        """``ready`` or ``missing``."""
        return "ready" if self.files is not None else "missing"


def required_models(config: JobConfig) -> list[ModelNeed]:
    """The diffusion models the job's enabled stages load, each named once."""
    cfg = config.prior
    if cfg.kind != "stable-diffusion":
        return []
    sd_stages = tuple(s for s in ("stage1", "geometry", "texture") if getattr(config, s).enabled)
    needs: list[ModelNeed] = []
    if sd_stages:
        needs.append(ModelNeed("prior", cfg.model, sd_stages, cfg.model_revision))
        lora_stages = tuple(s for s in sd_stages if getattr(config, s).method.score_model == "lora")
        if lora_stages and cfg.phi_model and cfg.phi_model != cfg.model:
            needs.append(ModelNeed("phi", cfg.phi_model, lora_stages, cfg.phi_model_revision))
    if config.refine.enabled:
        if sd_stages and cfg.refiner_model == cfg.model:
            needs[0] = ModelNeed("prior", cfg.model, needs[0].stages + ("refine",), cfg.model_revision)
        else:
            needs.append(ModelNeed("refiner", cfg.refiner_model, ("refine",), cfg.refiner_model_revision))
    return needs


def weights_variant(config: JobConfig, device_type: str) -> str | None:
    """The weights variant the job will read on a device of this type (fp16 for half precision)."""
    import torch

    from ..priors.latent_diffusion import pick_dtype

    if device_type == "cuda" and not torch.cuda.is_available():
        # Planning downloads for a GPU machine from one without: the GPU's automatic choice is bf16/fp16.
        return variant_for_dtype("float16" if config.prior.dtype == "auto" else config.prior.dtype)
    dtype = pick_dtype(config.prior.dtype, torch.device(device_type))
    return variant_for_dtype(str(dtype).removeprefix("torch."))


def model_states(config: JobConfig, device_type: str, download: bool = False) -> list[ModelState]:
    """Each needed model located on this machine (downloading what is missing when ``download``)."""
    variant = weights_variant(config, device_type)
    states = []
    for need in required_models(config):
        try:
            files = locate(need.model, need.role, variant, local_files_only=not download, revision=need.revision,
                           download=download)
            states.append(ModelState(need, files, None))
        except PriorLoadError as exc:
            states.append(ModelState(need, None, str(exc)))
    return states
