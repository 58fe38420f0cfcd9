"""Priors and score models by name: the one place where the job's settings become those objects."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..methods.registry import MethodConfig
from ..priors.base import IdentityScoreModel, Prior, ScoreModel
from ..priors.latent_diffusion import LatentDiffusionPrior
from .config import JobConfig
from .context import JobContext


def reference_renderer(config: JobConfig, device: torch.device):
    """The reference object of ``config.prior.reference`` ("builtin" or a mesh file), ready to render."""
    from ..priors.reference import ReferenceRenderer
    from ..scene.reference_object import builtin_house, load_reference

    if config.prior.reference == "builtin":
        return ReferenceRenderer(builtin_house(), device=device, colours_from="texture")
    loaded = load_reference(config.prior.reference)
    return ReferenceRenderer(loaded.mesh, loaded.vertex_colours, device=device, colours_from=loaded.colours_from)


def _tiny_cache(ctx: JobContext) -> Path:
    """Where a job keeps its tiny random models: beside its checkpoints, else in the output folder."""
    return ctx.checkpoint_dir if ctx.checkpoint_dir is not None else ctx.out_dir / ".cache"


def _diffusion_prior(ctx: JobContext, model: str, role: str, **kwargs) -> LatentDiffusionPrior:
    """A diffusion model of the job's settings in a role, with the device's fast path applied (SDPA;
    on CUDA also channels-last and the text encoder offloaded between prompt embeddings)."""
    from ..fastpath import apply_fast_path, for_device
    from ..priors.loading import load_diffusion_prior

    cfg = ctx.config.prior
    options = {"dtype": cfg.dtype, "local_files_only": cfg.local_files_only, **kwargs}
    prior = load_diffusion_prior(model, role, device=ctx.device, **options)
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
            from ..priors.tiny import tiny_model_folder

            folder = tiny_model_folder(_tiny_cache(ctx), "prior", seed=ctx.config.seed)
            prior = _diffusion_prior(ctx, str(folder), "prior", dtype="float32", local_files_only=True)
        else:
            # SD renders are 256 px in the paper; the VAE sees them at its native 512.
            prior = _diffusion_prior(ctx, cfg.model, "prior", encode_size=cfg.encode_size or None,
                                     revision=cfg.model_revision)
    ctx.cache["prior"] = prior
    return prior


def lora_settings(ctx: JobContext, method: MethodConfig) -> tuple[float, bool]:
    """(learning rate, camera embedding on) of a stage's LoRA: the method's own, else the prior's."""
    cfg = ctx.config.prior
    lr = cfg.lora_lr if method.lora_lr is None else method.lora_lr
    camera = cfg.camera_embedding if method.camera_embedding is None else method.camera_embedding
    return float(lr), bool(camera)


def release_diffusion_models(ctx: JobContext, keep: Prior | None = None) -> list[str]:
    """Drop the job's cached diffusion models except ``keep`` and return their memory; names of what went.

    Stage 3's refiner is the largest model of the pipeline: stages 1-2's UNets (and the LoRA
    adapters on them) must not stay alive beside it, so that the pipeline's peak is the largest
    stage's alone.
    """
    released = []
    for name in ("prior", "phi_base", "refiner"):
        model = ctx.cache.get(name)
        if model is not None and model is not keep and getattr(model, "is_latent", False):
            del ctx.cache[name]
            released.append(name)
    if released:
        import gc

        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return released


def enable_memory_savers(prior: Prior, device: torch.device) -> list[str]:
    """VAE slicing and tiling on CUDA (a 1024x1024 encode with gradients); names of what was enabled."""
    enabled: list[str] = []
    vae = getattr(prior, "vae", None)
    if vae is None or device.type != "cuda":
        return enabled
    for name in ("enable_slicing", "enable_tiling"):
        fn = getattr(vae, name, None)
        if callable(fn):
            fn()
            enabled.append(name)
    return enabled


def get_refiner(ctx: JobContext) -> Prior:
    """D_p of stage 3: the refiner model (the tiny random one for ``tiny``), or the exact reference prior.

    When ``prior.refiner_model`` is the job's own prior model, that one model serves both. Otherwise
    stages 1-2's models are released before the refiner is loaded.
    """
    cfg = ctx.config.prior
    if cfg.kind == "reference":
        return get_prior(ctx)
    if "refiner" in ctx.cache:
        return ctx.cache["refiner"]
    if cfg.kind != "tiny" and cfg.refiner_model == cfg.model and "prior" in ctx.cache:
        prior = ctx.cache["prior"]
        release_diffusion_models(ctx, keep=prior)
        ctx.cache["prior"] = ctx.cache["refiner"] = prior
        return prior
    release_diffusion_models(ctx)
    if cfg.kind == "tiny":
        from ..priors.tiny import tiny_model_folder

        folder = tiny_model_folder(_tiny_cache(ctx), "refiner", seed=ctx.config.seed)
        prior = _diffusion_prior(ctx, str(folder), "refiner", dtype="float32", local_files_only=True)
    else:
        prior = _diffusion_prior(ctx, cfg.refiner_model, "refiner", revision=cfg.refiner_model_revision)
    enable_memory_savers(prior, ctx.device)
    ctx.cache["refiner"] = prior
    return prior


def build_score_model(ctx: JobContext, prior: Prior, method: MethodConfig, stage: str,
                      phi_model: bool = True) -> tuple[ScoreModel, str]:
    """D_phi for a stage of a job and the name of what was built (reported, since "lora" may fall back).

    With ``phi_model`` the LoRA sits on ``prior.phi_model`` when that differs from the prior's model
    (the paper's SD 2.1-v base, loaded once per job); stage 3 passes False: its LoRA sits on the
    refiner itself.
    """
    cfg = ctx.config.prior
    phi_base = None
    if (phi_model and method.score_model == "lora" and prior.is_latent and cfg.kind == "stable-diffusion"
            and cfg.phi_model and cfg.phi_model != cfg.model):
        if "phi_base" not in ctx.cache:
            # The same fast path as D_p's model: this second UNet runs as often as the first.
            ctx.cache["phi_base"] = _diffusion_prior(ctx, cfg.phi_model, "phi", revision=cfg.phi_model_revision)
        phi_base = ctx.cache["phi_base"]
    return score_model_for(ctx, prior, method, stage, phi_base)


def score_model_for(ctx: JobContext, prior: Prior, method: MethodConfig, stage: str,
                    phi_base: Prior | None = None) -> tuple[ScoreModel, str]:
    """D_phi of ``method.score_model`` on ``prior`` (the one place a LoRA D_phi is built) and its name.

    Each stage gets its own LoRA adapter (named after the stage) on the shared UNet, or on
    ``phi_base`` when given.
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

    lr, camera = lora_settings(ctx, method)
    model = LoraScoreModel(prior, phi_base=phi_base, rank=cfg.lora_rank, lr=lr,
                           camera_embedding=camera, seed=ctx.config.seed,
                           adapter_name=f"dreamflow_phi_{stage}")
    return model, "lora"
