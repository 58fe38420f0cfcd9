"""2D mode: distil a prior into images (or latents) directly, ``g(theta) = theta``.

The 2D experiment of both papers: P particles are the parameters; a "render" returns them as
they are, and the one loop (methods/loop.py) runs any method on them. For a latent prior the
particles are latents and are decoded only for saving.
"""

from __future__ import annotations

import torch

from ..methods.loop import Problem, Rendered
from ..priors.base import Conditioning, Prior


class ParticleProblem(Problem):
    """P particles of shape ``shape`` optimised directly (the render is the particles)."""

    def __init__(self, init: torch.Tensor, lr: float):
        self.particles = torch.nn.Parameter(init.detach().clone().float())
        self.lr = float(lr)

    def param_groups(self) -> list[dict]:
        """One group: the particles."""
        return [{"params": [self.particles], "lr": self.lr}]

    def render(self, cameras) -> Rendered:
        """The particles themselves (no cameras in 2D)."""
        return Rendered(self.particles)

    def state_dict(self) -> dict:
        """The particles."""
        return {"particles": self.particles.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the particles in place (the optimiser keeps its reference)."""
        with torch.no_grad():
            self.particles.copy_(state["particles"])


class InPriorSpace(Prior):
    """A prior whose ``encode`` is the identity: the particles already live in its space.

    The loop encodes every render; 2D particles of a latent prior are latents already.
    """

    def __init__(self, prior: Prior):
        self.inner = prior
        self.is_latent = prior.is_latent

    def sigma(self, t):
        """The wrapped prior's noise level."""
        return self.inner.sigma(t)

    def encode(self, images):
        """Identity: particles are in the prior's space."""
        return images

    def decode(self, x):
        """The wrapped prior's decoder."""
        return self.inner.decode(x)

    def condition(self, prompt, negative_prompt="", guidance=7.5) -> Conditioning:
        """The wrapped prior's conditioning."""
        return self.inner.condition(prompt, negative_prompt, guidance)

    def denoise(self, x_noisy, sigma, cond, cameras=None, guidance=None):
        """The wrapped prior's denoiser."""
        return self.inner.denoise(x_noisy, sigma, cond, cameras, guidance)
