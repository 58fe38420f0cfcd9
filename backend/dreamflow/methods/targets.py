"""The target rules: given a render, return the detached point it should move to.

Every method minimises ``0.5 * ||x - sg(x_hat)||^2``, so the gradient on the render is exactly
``x - x_hat``. All four methods share one form, ``x_hat = x + lam * (D_p - D_phi)`` evaluated on
the same noisy sample ``x + sigma * n``; they differ in the factor ``lam`` (here), in how ``t`` is
chosen (schedules.py), in the noise (noise.py) and in ``D_phi`` (a LoRA model, the exact
empirical model, or the identity, which turns the rule into SDS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..devices import host_value, upload
from ..priors.base import Conditioning, Prior, ScoreModel
from ..scene.cameras import Cameras
from .noise import NoiseSource
from .schedules import StepInfo


@dataclass
class TargetContext:
    """What a rule may look at for one iteration besides the render itself."""

    prior: Prior
    score_model: ScoreModel
    cond: Conditioning
    cameras: Cameras | None
    noise: NoiseSource
    alpha: torch.Tensor | None = None  # render opacity (B, 1, H, W), for background-aware noise
    generator: torch.Generator | None = None


@dataclass
class TargetResult:
    """The detached target and the quantities logged per step."""

    target: torch.Tensor
    sigma: float


def target_sigma(prior: Prior, t_next: float) -> torch.Tensor:
    """The noise level a step moves to: the prior's table, except that ``t = 0`` is the ODE's end.

    The DDPM table's smallest entry (step 0, sigma about 0.03 for SD) is where the model stops
    training, not where sampling ends: a plan running to ``t_end = 0`` takes its last Euler step
    to sigma = 0, as a DDIM/Euler sampler's final step does (DreamFlow's stage 3, 0.3 -> 0.0).
    """
    if t_next <= 0.0:
        return torch.zeros((), dtype=torch.float32)
    return prior.sigma(t_next).float()


class TargetRule(ABC):
    """``x_hat = x + lam(sigma_i, sigma_next) * (D_p(x + sigma n) - D_phi(x + sigma n))``."""

    @abstractmethod
    def factor(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The step size ``lam`` multiplying ``D_p - D_phi``."""

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: StepInfo, ctx: TargetContext) -> TargetResult:
        """Detached target for render(s) ``x`` (B, C, H, W) at this step."""
        prior = ctx.prior
        # Noise levels come from the schedule on the host: logged without a device read, uploaded
        # without a stall.
        sigma_host = prior.sigma(step.t).float()
        sigma = upload(sigma_host, x.device)
        sigma_next = upload(target_sigma(prior, step.t_next), x.device)
        n = ctx.noise.sample(x, ctx.cameras, ctx.alpha, ctx.generator)
        x_noisy = x + sigma.to(x.dtype) * n
        d_p = prior.denoise(x_noisy, sigma, ctx.cond, ctx.cameras)
        d_phi = ctx.score_model.denoise(x_noisy, sigma, ctx.cond, ctx.cameras, x_clean=x)
        lam = self.factor(sigma, sigma_next).to(x.dtype)
        return TargetResult((x + lam * (d_p.to(x.dtype) - d_phi.to(x.dtype))).detach(), host_value(sigma_host))


class ApfoTarget(TargetRule):
    """DreamFlow's APFO (Eq. 12-13): one Euler step of the probability-flow ODE, sigma_i -> sigma_next.

    ``lam = (sigma_i - sigma_next) / sigma_i``: it moves ``x`` towards the prior's prediction and
    away from the score model's (Algorithm 1 as printed has the opposite sign; see method.md).
    """

    def factor(self, sigma, sigma_next):
        """Relative decrease of the noise level over this step."""
        return (sigma - sigma_next) / sigma


class ScoreDistillationTarget(TargetRule):
    """SDS / VSD / FSD: gradient ``w(t) (eps_phi - eps_p)`` written in denoiser form.

    With ``eps = (x_noisy - D) / sigma`` the gradient on ``x`` is ``w (D_phi - D_p) / sigma``, so
    ``lam = w / sigma``, with DreamFusion's ``w(t) = 1 - alpha_bar_t = sigma^2 / (1 + sigma^2)``
    (ProlificDreamer uses the same weight for VSD). ``scale`` multiplies it (a learning-rate knob).
    """

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def factor(self, sigma, sigma_next):
        """``w(sigma) / sigma`` with ``w = sigma^2 / (1 + sigma^2)``."""
        return self.scale * sigma / (1.0 + sigma * sigma)
