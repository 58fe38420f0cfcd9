"""Noise levels of a DDPM model as EDM sigmas, and the normalised time ``t = step / 1000``.

Every prior in the project maps ``t`` to ``sigma`` through a table of this kind, so that a
schedule (``t`` from 1.0 down to 0.2, say) means the same noise levels whatever the prior: the
analytic priors reuse Stable Diffusion's own table.
"""

from __future__ import annotations

import torch


class DdpmNoiseLevels:
    """``sigma(t)`` from a DDPM ``alphas_cumprod`` table: ``sigma = sqrt((1 - abar) / abar)``.

    ``t`` in [0, 1] is the DDPM step divided by 1000 (the table's length), clamped to the last
    step; between integer steps sigma is interpolated linearly. ``t = 0`` is step 0, the model's
    smallest noise level (about 0.03 for Stable Diffusion), not zero.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.alphas_cumprod = abar
        self.sigmas = ((1.0 - abar) / abar).sqrt()
        self.num_steps = int(abar.shape[0])
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def step_of(self, t: torch.Tensor | float) -> torch.Tensor:
        """Fractional DDPM step of normalised time ``t`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (t * self.num_steps).clamp(0.0, self.num_steps - 1)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """EDM noise level at normalised time ``t`` (float32, same shape as ``t``)."""
        step = self.step_of(t)
        lo = step.floor().long()
        hi = (lo + 1).clamp(max=self.num_steps - 1)
        frac = step - lo.to(torch.float64)
        s = self.sigmas[lo] * (1.0 - frac) + self.sigmas[hi] * frac
        return s.to(torch.float32)

    def step_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM step whose (interpolated) sigma is ``sigma``; the inverse of sigma(t * 1000).

        Computed on ``sigma``'s device with searchsorted, so a UNet call costs no device-to-host sync
        (which would also break CUDA graphs); outside the table it clamps to the first/last step.
        """
        wide = torch.float32 if sigma.device.type == "mps" else torch.float64
        key = (sigma.device, wide)
        if key not in self._tables:  # moved once per device, not once per UNet call
            self._tables[key] = self.sigmas.to(sigma.device, wide)
        table = self._tables[key]
        s = sigma.detach().to(wide)
        hi = torch.searchsorted(table, s).clamp(1, self.num_steps - 1)
        lo_s, hi_s = table[hi - 1], table[hi]
        frac = ((s - lo_s) / (hi_s - lo_s)).clamp(0.0, 1.0)
        return ((hi - 1).to(wide) + frac).to(torch.float32)

    def alpha_bar(self, sigma: torch.Tensor) -> torch.Tensor:
        """``abar = 1 / (1 + sigma^2)``: the DDPM signal level of an EDM noise level."""
        return 1.0 / (1.0 + sigma * sigma)


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 steps: int = 1000) -> torch.Tensor:
    """``alphas_cumprod`` of the "scaled_linear" schedule Stable Diffusion 1.x/2.x and SDXL use."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def stable_diffusion_noise_levels() -> DdpmNoiseLevels:
    """The SD 2.x / SDXL noise levels (scaled_linear, 0.00085..0.012, 1000 steps)."""
    return DdpmNoiseLevels(scaled_linear_alphas_cumprod())
