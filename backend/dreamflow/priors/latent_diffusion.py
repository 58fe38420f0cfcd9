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

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch

from ..devices import host_list, upload
from ..scene.cameras import VIEW_SUFFIXES, Cameras, view_suffix
from .base import Conditioning, Prior, as_sigma
from .noise_levels import DdpmNoiseLevels


class PriorLoadError(RuntimeError):
    """A model (or one of its parts) could not be loaded; the message says what and how to fix it."""


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA that supports it, else float16 on CUDA/MPS, float32 on CPU."""
    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_part(cls: Any, model: str, subfolder: str | None, local_files_only: bool, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, subfolder=...)`` with an error that names the model and part."""
    try:
        if subfolder is None:
            return cls.from_pretrained(model, local_files_only=local_files_only, **kwargs)
        return cls.from_pretrained(model, subfolder=subfolder, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as exc:  # EnvironmentError, HFValidationError, missing files
        where = "a local folder" if Path(model).exists() else "the Hugging Face cache"
        how = ("download it once on a machine with internet (`hf download {m}` or "
               "`huggingface-cli download {m}`) and copy the cache, or pass a local folder that holds "
               "the full diffusers layout").format(m=model)
        if not local_files_only:
            how += "; check the model id and the network"
        raise PriorLoadError(f"could not load the {subfolder or 'config'} of model {model!r} from {where}"
                             f"{' (local files only)' if local_files_only else ''}: {str(exc).rstrip('.')}. "
                             f"To fix: {how}.") from exc


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module; cast only when its dtype differs (diffusers warns on needless casts)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module


def read_model_index(model: str, local_files_only: bool) -> dict:
    """The pipeline's model_index.json (flags such as requires_aesthetics_score)."""
    path = Path(model) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    from diffusers import DiffusionPipeline

    return dict(load_part(DiffusionPipeline, model, None, local_files_only, return_unused_kwargs=False))


class TextConditioner(ABC):
    """How one model family turns prompts into UNet conditioning (the only per-family code)."""

    @classmethod
    @abstractmethod
    def load(cls, model: str, index: dict, device: torch.device, dtype: torch.dtype,
             local_files_only: bool) -> "TextConditioner":
        """Load the family's tokenizer(s) and text encoder(s) from a pipeline folder or id."""

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
                        encode_size: int | None = None, load_vae: bool = True, **kwargs: Any) -> "LatentDiffusionPrior":
        """Load a diffusers pipeline folder or hub id (its UNet, VAE, text encoder(s), scheduler)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        device = torch.device(device)
        torch_dtype = pick_dtype(dtype, device)
        index = read_model_index(model, local_files_only)
        sched = load_part(DDPMScheduler, model, "scheduler", local_files_only)
        unet = load_part(UNet2DConditionModel, model, "unet", local_files_only, torch_dtype=torch_dtype)
        vae = load_part(AutoencoderKL, model, "vae", local_files_only, torch_dtype=torch_dtype) if load_vae else None
        conditioner = cls.conditioner_class.load(model, index, device, torch_dtype, local_files_only, **kwargs)
        return cls(unet, vae, conditioner, sched.alphas_cumprod, sched.config.prediction_type, device,
                   torch_dtype, view_dependent, encode_size, model)

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

