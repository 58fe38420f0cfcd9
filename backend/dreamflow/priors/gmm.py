"""A Gaussian-mixture prior with an exact denoiser: the method's ground truth without weights.

Data ``sum_k pi_k N(mu_k, s^2 I)``. At noise level ``sigma`` the exact denoiser is
``D(x; sigma) = sum_k r_k(x) [mu_k + s^2 / (s^2 + sigma^2) (x - mu_k)]`` with responsibilities
``r_k ∝ pi_k exp(-||x - mu_k||^2 / (2 (s^2 + sigma^2)))``. A prompt names a sub-mixture (a set
of component indices); the empty prompt is the full mixture, which is also the unconditional
model, so classifier-free guidance is exact. ``t`` maps to ``sigma`` through Stable Diffusion's
DDPM table, so a schedule means the same noise levels here as with SD.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..scene.cameras import Cameras
from .base import Conditioning, Prior, as_sigma
from .noise_levels import DdpmNoiseLevels, stable_diffusion_noise_levels


def mixture_denoise(x_noisy: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor,
                    log_weights: torch.Tensor, std: float) -> torch.Tensor:
    """Exact denoiser of ``sum_k softmax(log_weights)_k N(means_k, std^2 I)`` at noise ``sigma``.

    ``x_noisy`` (B, ...), ``means`` (K, ...) with the same trailing shape, ``sigma`` scalar or (B,).
    Computed in float64: responsibilities of far-apart modes underflow in float32.
    """
    b = x_noisy.shape[0]
    x = x_noisy.reshape(b, -1).to(torch.float64)
    mu = means.reshape(means.shape[0], -1).to(device=x.device, dtype=torch.float64)
    var = std * std + as_sigma(sigma, x).to(torch.float64).reshape(b, 1) ** 2  # (B, 1)
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ mu.T + (mu * mu).sum(1)[None]  # (B, K)
    logits = log_weights.to(device=x.device, dtype=torch.float64)[None] - d2.clamp(min=0.0) / (2.0 * var)
    r = torch.softmax(logits, dim=1)
    shrink = (std * std) / var
    out = (r @ mu) * (1.0 - shrink) + shrink * x
    return out.reshape(x_noisy.shape).to(x_noisy.dtype)


class GaussianMixturePrior(Prior):
    """Isotropic Gaussian mixture in image space; prompts select sub-mixtures by name."""

    is_latent = False

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None,
                 groups: Mapping[str, Sequence[int]] | None = None,
                 noise_levels: DdpmNoiseLevels | None = None):
        if means.ndim < 2:
            raise ValueError("means must be (K, ...) with one row per component")
        self.means = means.detach().to(torch.float32)
        self.std = float(std)
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError("weights must be K positive numbers")
        self.log_weights = torch.log(w / w.sum()).to(torch.float64)
        self.groups = {name: [int(i) for i in idx] for name, idx in (groups or {}).items()}
        for name, idx in self.groups.items():
            if not idx or min(idx) < 0 or max(idx) >= k:
                raise ValueError(f"group {name!r} must name components in 0..{k - 1}")
        self.levels = noise_levels or stable_diffusion_noise_levels()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, H, W)."""
        return tuple(self.means.shape[1:])

    @classmethod
    def random(cls, shape: Sequence[int] = (3, 16, 16), modes: int = 4, std: float = 0.05,
               seed: int = 0) -> "GaussianMixturePrior":
        """K equally weighted modes that are smooth random colour images in [0.1, 0.9].

        Prompts: ``"mode<k>"`` picks one component; ``""`` is the whole mixture.
        """
        g = torch.Generator().manual_seed(seed)
        c, h, w = shape
        coarse = torch.rand(modes, c, max(2, h // 4), max(2, w // 4), generator=g)
        means = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
        means = 0.1 + 0.8 * means
        return cls(means, std, groups={f"mode{k}": [k] for k in range(modes)})

    def sigma(self, t):
        """Stable Diffusion's noise level at normalised time ``t``."""
        return self.levels.sigma(t)

    def components(self, prompt: str) -> list[int]:
        """Component indices a prompt selects (all of them for the empty prompt)."""
        if prompt.strip() == "":
            return list(range(self.means.shape[0]))
        if prompt not in self.groups:
            raise ValueError(f"the Gaussian-mixture prior knows no prompt {prompt!r}; "
                             f"use '' (all modes) or one of: {', '.join(sorted(self.groups))}")
        return self.groups[prompt]

    def condition(self, prompt, negative_prompt="", guidance=7.5):
        """Select the prompt's sub-mixture; the negative prompt's (default: all) is the unconditional."""
        return Conditioning(prompt, negative_prompt, guidance,
                            {"cond": self.components(prompt), "uncond": self.components(negative_prompt)})

    def denoise_components(self, x_noisy: torch.Tensor, sigma, components: Sequence[int]) -> torch.Tensor:
        """Exact denoiser of the sub-mixture made of ``components`` (renormalised weights)."""
        idx = torch.as_tensor(list(components), dtype=torch.long)
        return mixture_denoise(x_noisy, torch.as_tensor(sigma), self.means[idx].to(x_noisy.device),
                               self.log_weights[idx], self.std)

    def denoise(self, x_noisy, sigma, cond, cameras: Cameras | None = None, guidance=None):
        """``D_u + guidance * (D_c - D_u)`` with exact sub-mixture denoisers."""
        g = cond.guidance if guidance is None else float(guidance)
        d_c = self.denoise_components(x_noisy, sigma, cond.data["cond"])
        if g == 1.0 or cond.data["cond"] == cond.data["uncond"]:
            return d_c
        d_u = self.denoise_components(x_noisy, sigma, cond.data["uncond"])
        return d_u + g * (d_c - d_u)

    def sample(self, n: int, components: Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` exact samples of the (sub-)mixture."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.as_tensor(list(components) if components is not None else range(self.means.shape[0]))
        p = torch.softmax(self.log_weights[idx], 0)
        pick = idx[torch.multinomial(p, n, replacement=True, generator=g)]
        return self.means[pick] + self.std * torch.randn(n, *self.sample_shape, generator=g)

    def nearest_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the nearest mode, RMS per-coordinate distance to it) for each sample in ``x``."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        mu = self.means.reshape(self.means.shape[0], -1).to(torch.float64)
        d = torch.cdist(flat, mu)
        best, idx = d.min(dim=1)
        return idx, (best / flat.shape[1] ** 0.5).to(torch.float32)
