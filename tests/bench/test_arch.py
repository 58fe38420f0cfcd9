"""The architectures written out as data have the published models' sizes (so their FLOPs)."""

from __future__ import annotations

import torch

from bench.arch import ARCHS, parameter_count


def _parts(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHS[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        text_cls = CLIPTextModel if spec.family == "sd" else CLIPTextModelWithProjection
        return (UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae), text_cls(CLIPTextConfig(**spec.text)))


def test_published_parameter_counts():
    unet, vae, text = _parts("sd21")
    assert parameter_count(unet) == 865_910_724
    assert parameter_count(vae) == 83_653_863
    assert parameter_count(text) == 340_387_840
    unet, vae, text = _parts("sdxl-refiner")
    assert parameter_count(unet) == 2_259_526_660
    assert parameter_count(vae) == 83_653_863
    assert parameter_count(text) == 694_659_840
    assert unet.config.addition_embed_type == "text_time"


def test_tiny_prior_is_the_project_prior_class(tiny_prior):
    from dreamflow.priors.stable_diffusion import StableDiffusionPrior

    assert type(tiny_prior) is StableDiffusionPrior and tiny_prior.is_latent
    # ... and it does what the loop asks of a prior: renders -> latents -> a guided denoise of them.
    latents = tiny_prior.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    sigma = tiny_prior.sigma(0.5)
    out = tiny_prior.denoise(latents + sigma * torch.randn_like(latents), sigma, tiny_prior.condition("a house", "", 7.5))
    assert latents.shape[:2] == (2, 4) and out.shape == latents.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, latents)
