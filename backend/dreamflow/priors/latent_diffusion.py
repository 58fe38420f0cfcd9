"""Latent diffusion priors (Stable Diffusion, the SDXL refiner) behind the EDM ``Prior`` interface.

One class does the work for every model family: loading, the DDPM <-> EDM conversion, guidance
with conditional and unconditional halves in one UNet pass, view-dependent prompts and the VAE.
What differs between families is only how a prompt becomes UNet conditioning; that is a small
:class:`TextConditioner` per family (stable_diffusion.py, sdxl_refiner.py).

Conversion (method.md): ``sigma = sqrt((1 - abar) / abar)``; the UNet sees
``x_t = (x0 + sigma n) / sqrt(1 + sigma^2)`` at the (fractional) DDPM step whose sigma that is;
an epsilon model gives ``D = x_noisy - sigma eps_hat``, a v model
``D = sqrt(abar) x_t - sqrt(1 - abar) v_hat``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from ..devices import host_list, upload, warn_if_slow_bf16
from ..scene.cameras import VIEW_SUFFIXES, Cameras, view_suffix
from .base import Conditioning, Prior, as_sigma
from .hub import DEFAULT_REVISION, ROLE_LABELS, ModelFiles, PriorLoadError, locate, variant_for_dtype
from .noise_levels import DdpmNoiseLevels

__all__ = ["LatentDiffusionPrior", "PriorLoadError", "TextConditioner", "UNetDenoiser", "load_part", "pick_dtype"]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA that supports it, else float16 on CUDA/MPS, float32 on CPU. An explicit
    bfloat16 on a CPU without bf16 instructions is kept, with a one-line warning of its cost."""
    if name != "auto":
        if name == "bfloat16":
            warn_if_slow_bf16(device)
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_part(cls: Any, files: ModelFiles, part: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` of one located part, with an error that names the model, role and part."""
    options: dict[str, Any] = {"subfolder": part, "local_files_only": True}
    if part in files.weights:
        options["variant"] = files.variant(part)
        options["use_safetensors"] = files.uses_safetensors(part)
    try:
        return cls.from_pretrained(str(files.folder), **options, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # damaged files, shape mismatches
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PriorLoadError(f"{part} of model {files.model!r} ({ROLE_LABELS.get(files.role, files.role)}) "
                             f"could not be read: {detail}. To fix: download the model again "
                             f"(`dreamflow models fetch`), or check the folder's {part}/ files.") from None


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module; cast only when its dtype differs (diffusers warns on needless casts)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module


class TextConditioner(ABC):
    """How one model family turns prompts into UNet conditioning (the only per-family code)."""

    @classmethod
    @abstractmethod
    def load(cls, files: ModelFiles, device: torch.device, dtype: torch.dtype) -> "TextConditioner":
        """Load the family's tokenizer(s) and text encoder(s) from a located pipeline."""

    @abstractmethod
    def check(self, unet: torch.nn.Module, files: ModelFiles) -> None:
        """Raise PriorLoadError when the UNet cannot take this conditioning (a wrong part)."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], negative: bool) -> dict[str, torch.Tensor]:
        """UNet keyword tensors for a batch of prompts, each with batch dimension len(prompts).

        Keys: ``encoder_hidden_states`` and optionally ``text_embeds`` / ``time_ids`` (SDXL's
        ``added_cond_kwargs``). ``negative`` marks the unconditional side (SDXL's aesthetic score).
        """


def _pick(embeds: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in embeds.items()}


def _unet_kwargs(embeds: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds["encoder_hidden_states"].to(dtype)}
    added = {k: embeds[k].to(dtype) for k in ("text_embeds", "time_ids") if k in embeds}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


class UNetDenoiser:
    """A diffusers UNet as an EDM denoiser: conversion, prediction type, fractional timesteps."""

    def __init__(self, unet: torch.nn.Module, levels: DdpmNoiseLevels, prediction_type: str, dtype: torch.dtype):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")
        self.unet = unet
        self.levels = levels
        self.prediction_type = prediction_type
        self.dtype = dtype

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional DDPM step whose sigma is ``sigma`` (inverse of the linear interpolation)."""
        return self.levels.step_of_sigma(sigma)

    def model_input(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """DDPM-scale UNet input ``x_noisy / sqrt(1 + sigma^2)``."""
        return x_noisy / (1.0 + as_sigma(sigma, x_noisy) ** 2).sqrt()

    def to_x0(self, out: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Clean estimate from the raw UNet output."""
        s = as_sigma(sigma, x_noisy)
        if self.prediction_type == "epsilon":
            return x_noisy - s * out
        abar = 1.0 / (1.0 + s * s)
        return abar.sqrt() * self.model_input(x_noisy, sigma) - (1.0 - abar).sqrt() * out

    def raw(self, x_noisy: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's raw prediction (epsilon or v), float32, for EDM-scale ``x_noisy``."""
        sigma = as_sigma(sigma, x_noisy).reshape(-1)
        x_in = self.model_input(x_noisy.float(), sigma).to(self.dtype)
        t = self.timestep(sigma)
        return self.unet(x_in, t, **_unet_kwargs(embeds, self.dtype)).sample.float()

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """EDM denoiser ``D(x_noisy; sigma)`` under the given conditioning, float32."""
        sigma = as_sigma(sigma, x_noisy).reshape(-1).float()
        return self.to_x0(self.raw(x_noisy, sigma, embeds), x_noisy.float(), sigma)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The regression target of the denoising loss for this prediction type (eps or v)."""
        if self.prediction_type == "epsilon":
            return noise
        s = as_sigma(sigma, x0)
        abar = 1.0 / (1.0 + s * s)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0


class LatentDiffusionPrior(Prior):
    """A latent diffusion model as an EDM prior (see the module docstring)."""

    is_latent = True
    conditioner_class: type[TextConditioner]
    #: The model_index.json ``_class_name`` values this prior reads, and the role it plays by default.
    pipeline_classes: tuple[str, ...] = ()
    default_role: str = "prior"

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module | None, conditioner: TextConditioner,
                 alphas_cumprod: torch.Tensor, prediction_type: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, view_dependent: bool = True, encode_size: int | None = None,
                 model_id: str = ""):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_id = model_id
        self.levels = DdpmNoiseLevels(alphas_cumprod)
        self.unet = _to(unet, self.device, dtype).eval().requires_grad_(False)
        self.denoiser = UNetDenoiser(self.unet, self.levels, prediction_type, dtype)
        self.vae = vae
        self.vae_dtype = dtype
        if vae is not None:
            # Some VAEs (SDXL's) overflow in float16; their config asks to stay in float32.
            if getattr(vae.config, "force_upcast", False) and dtype == torch.float16:
                self.vae_dtype = torch.float32
            self.vae = _to(vae, self.device, self.vae_dtype).eval().requires_grad_(False)
        self.conditioner = conditioner
        self.view_dependent = view_dependent
        self.encode_size = encode_size

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, device: torch.device | str = "cpu", dtype: str = "auto",
                        local_files_only: bool = False, view_dependent: bool = True,
                        encode_size: int | None = None, load_vae: bool = True, role: str | None = None,
                        revision: str = DEFAULT_REVISION, **kwargs: Any) -> "LatentDiffusionPrior":
        """Load a diffusers pipeline folder or hub id: only its UNet, VAE, text encoder(s) and scheduler."""
        device = torch.device(device)
        torch_dtype = pick_dtype(dtype, device)
        role = role or cls.default_role
        if not load_vae and role == "prior":
            role = "phi"
        files = locate(model, role, variant_for_dtype(str(torch_dtype).removeprefix("torch.")), local_files_only,
                       revision)
        return cls.from_files(files, device, torch_dtype, view_dependent, encode_size, **kwargs)

    @classmethod
    def from_files(cls, files: ModelFiles, device: torch.device, torch_dtype: torch.dtype,
                   view_dependent: bool = True, encode_size: int | None = None, **kwargs: Any) -> "LatentDiffusionPrior":
        """Build the prior from a located model (see hub.locate), checking that its parts fit together."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        expected = cls.pipeline_classes
        if files.pipeline_class not in expected:
            raise PriorLoadError(f"model {files.model!r} ({ROLE_LABELS.get(files.role, files.role)}) is a "
                                 f"{files.pipeline_class}, not a {' or '.join(expected)}. To fix: load it with "
                                 f"load_diffusion_prior, which picks the prior class from the model index.")
        sched = load_part(DDPMScheduler, files, "scheduler")
        unet = load_part(UNet2DConditionModel, files, "unet", torch_dtype=torch_dtype)
        vae = load_part(AutoencoderKL, files, "vae", torch_dtype=torch_dtype) if "vae" in files.parts else None
        latent_channels = int(vae.config.latent_channels) if vae is not None else 4
        if int(unet.config.in_channels) != latent_channels or int(unet.config.out_channels) != latent_channels:
            raise PriorLoadError(
                f"unet of model {files.model!r} ({ROLE_LABELS.get(files.role, files.role)}) takes "
                f"{unet.config.in_channels} input and gives {unet.config.out_channels} output channels, but the "
                f"latents have {latent_channels} (an inpainting or depth UNet?). To fix: use a text-to-image "
                f"model whose unet works on {latent_channels}-channel latents.")
        conditioner = cls.conditioner_class.load(files, device, torch_dtype, **kwargs)
        conditioner.check(unet, files)
        return cls(unet, vae, conditioner, sched.alphas_cumprod, sched.config.prediction_type, device,
                   torch_dtype, view_dependent, encode_size, files.model)

    # -- Prior interface ---------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``."""
        return self.denoiser.prediction_type

    def sigma(self, t):
        """The model's own noise level at ``t = step / 1000``."""
        return self.levels.sigma(t)

    def condition(self, prompt, negative_prompt="", guidance=7.5):
        """Embed the prompt, each view-suffixed prompt and the negative prompt once."""
        texts = [prompt] + ([f"{prompt}, {s}" for s in VIEW_SUFFIXES] if self.view_dependent else [])
        with torch.no_grad():
            cond = self.conditioner.encode(texts, negative=False)
            uncond = self.conditioner.encode([negative_prompt], negative=True)
        return Conditioning(prompt, negative_prompt, guidance, {"cond": cond, "uncond": uncond, "prior": id(self)})

    def prompt_index(self, batch: int, cameras: Cameras | None) -> torch.Tensor:
        """Which embedded prompt each sample uses: 0 plain, 1 + suffix index with cameras."""
        if cameras is None or not self.view_dependent:
            return torch.zeros(batch, dtype=torch.long)
        if len(cameras) != batch:
            raise ValueError(f"{len(cameras)} cameras for a batch of {batch}")
        host = cameras.host()  # the sampler's CPU draws: no device read in the middle of a step
        az = host_list(host.azimuth_deg.detach())
        el = host_list(host.elevation_deg.detach())
        return torch.tensor([1 + VIEW_SUFFIXES.index(view_suffix(a, e)) for a, e in zip(az, el)])

    def cond_embeds(self, cond: Conditioning, batch: int, cameras: Cameras | None) -> dict[str, torch.Tensor]:
        """Per-sample conditional embeddings (view suffixes picked from the cameras)."""
        return _pick(cond.data["cond"], upload(self.prompt_index(batch, cameras), self.device))

    @torch.no_grad()
    def denoise(self, x_noisy, sigma, cond, cameras=None, guidance=None):
        """Guided ``D_u + guidance (D_c - D_u)``; both halves in one UNet pass."""
        g = cond.guidance if guidance is None else float(guidance)
        b = x_noisy.shape[0]
        sig = as_sigma(sigma, x_noisy).reshape(-1).float()
        c = self.cond_embeds(cond, b, cameras)
        if g == 1.0:
            return self.denoiser(x_noisy, sig, c).to(x_noisy.dtype)
        u = _pick(cond.data["uncond"], torch.zeros(b, dtype=torch.long, device=self.device))
        both = {k: torch.cat([c[k], u[k]]) for k in c}
        d = self.denoiser(torch.cat([x_noisy, x_noisy]), torch.cat([sig, sig]), both)
        d_c, d_u = d[:b], d[b:]
        return (d_u + g * (d_c - d_u)).to(x_noisy.dtype)

    def encode(self, images):
        """Renders in [0, 1] -> scaled VAE latents (posterior mean), differentiably."""
        if self.vae is None:
            raise RuntimeError("this prior was loaded without its VAE")
        x = images
        if self.encode_size is not None and x.shape[-1] != self.encode_size:
            x = torch.nn.functional.interpolate(x, size=(self.encode_size, self.encode_size), mode="bilinear",
                                                align_corners=False)
        x = (2.0 * x - 1.0).to(self.device, self.vae_dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return latents.float() * float(self.vae.config.scaling_factor)

    def decode(self, x):
        """Scaled latents -> images in [0, 1]."""
        if self.vae is None:
            raise RuntimeError("this prior was loaded without its VAE")
        z = (x / float(self.vae.config.scaling_factor)).to(self.device, self.vae_dtype)
        return ((self.vae.decode(z).sample.float() + 1.0) * 0.5).clamp(0.0, 1.0)

