"""Priors and score models by name: the one place where the job's settings become those objects."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..methods.registry import MethodConfig
from ..priors.base import IdentityScoreModel, Prior, ScoreModel
from .config import JobConfig
from .context import JobContext


def reference_renderer(config: JobConfig, device: torch.device):
    """The reference object of ``config.prior.reference`` ("builtin" or a mesh file), ready to render."""
    from ..priors.reference import ReferenceRenderer
    from ..scene.reference_object import builtin_house, load_reference

    if config.prior.reference == "builtin":
        return ReferenceRenderer(builtin_house(), device=device)
    mesh, colours = load_reference(config.prior.reference)
    return ReferenceRenderer(mesh, colours, device=device)


def _tiny_folder(ctx: JobContext) -> Path:
    base = ctx.checkpoint_dir if ctx.checkpoint_dir is not None else ctx.out_dir / ".cache"
    return base / "tiny-stable-diffusion"


def _stable_diffusion(ctx: JobContext, model: str, **kwargs) -> Prior:
    """A Stable Diffusion model of the job's settings, with the device's fast path applied (SDPA;
    on CUDA also channels-last and the text encoder offloaded between prompt embeddings)."""
    from ..fastpath import apply_fast_path, for_device
    from ..priors.stable_diffusion import StableDiffusionPrior

    cfg = ctx.config.prior
    options = {"dtype": cfg.dtype, "local_files_only": cfg.local_files_only, **kwargs}
    prior = StableDiffusionPrior.from_pretrained(model, device=ctx.device, **options)
    apply_fast_path(prior, for_device(ctx.device), ctx.device)
    return prior


def get_prior(ctx: JobContext) -> Prior:
    """The job's pretrained prior D_p, built once and shared by its stages."""
    if "prior" in ctx.cache:
        return ctx.cache["prior"]
    cfg = ctx.config.prior
    if cfg.kind == "reference":
        from ..priors.reference import ReferenceObjectPrior

        if ctx.reference is None:
            ctx.reference = reference_renderer(ctx.config, ctx.device)
        prior: Prior = ReferenceObjectPrior(ctx.reference, cfg.reference_std)
    else:
        if not ctx.config.prompt.strip():
            raise ConfigError(f"the {cfg.kind} prior is a text-to-image model and needs a prompt; got an empty one")
        if cfg.kind == "tiny":
            from ..priors.tiny import tiny_stable_diffusion

            folder = tiny_stable_diffusion(_tiny_folder(ctx), seed=ctx.config.seed)
            prior = _stable_diffusion(ctx, str(folder), dtype="float32", local_files_only=True)
        else:
            # SD renders are 256 px in the paper; the VAE sees them at its native 512.
            prior = _stable_diffusion(ctx, cfg.model, encode_size=512)
    ctx.cache["prior"] = prior
    return prior


def lora_settings(ctx: JobContext, method: MethodConfig) -> tuple[float, bool]:
    """(learning rate, camera embedding on) of a stage's LoRA: the method's own, else the prior's."""
    cfg = ctx.config.prior
    lr = cfg.lora_lr if method.lora_lr is None else method.lora_lr
    camera = cfg.camera_embedding if method.camera_embedding is None else method.camera_embedding
    return float(lr), bool(camera)


def build_score_model(ctx: JobContext, prior: Prior, method: MethodConfig, stage: str) -> tuple[ScoreModel, str]:
    """D_phi for a stage and the name of what was built (reported, since "lora" may fall back).

    Each stage gets its own LoRA adapter (named after the stage) on the shared UNet.
    """
    cfg = ctx.config.prior
    kind = method.score_model
    if kind == "identity":
        return IdentityScoreModel(), "identity"
    if not prior.is_latent:
        # Under an exact per-camera prior the renders of a fixed camera are one point, whose exact
        # denoiser is the identity; a LoRA needs a UNet and would only approximate it.
        return IdentityScoreModel(), "exact-identity"
    if kind == "exact":
        from ..priors.score_models import EmpiricalScoreModel

        return EmpiricalScoreModel(std=cfg.reference_std), "empirical"
    from ..priors.score_models import LoraScoreModel

    phi_base = None
    if cfg.kind == "stable-diffusion" and cfg.phi_model and cfg.phi_model != cfg.model:
        if "phi_base" not in ctx.cache:
            # The same fast path as D_p's model: this second UNet runs as often as the first.
            ctx.cache["phi_base"] = _stable_diffusion(ctx, cfg.phi_model, load_vae=False)
        phi_base = ctx.cache["phi_base"]
    lr, camera = lora_settings(ctx, method)
    model = LoraScoreModel(prior, phi_base=phi_base, rank=cfg.lora_rank, lr=lr,
                           camera_embedding=camera, seed=ctx.config.seed,
                           adapter_name=f"dreamflow_phi_{stage}")
    return model, "lora"
