"""The two small interfaces every method talks to: a prior and a score model of the renders.

Everything is in EDM (Karras) form: data ``x`` (an image, or a VAE latent of one), noise level
``sigma``, noisy sample ``x + sigma * n``; a denoiser returns its estimate of the clean ``x``. The
score is ``(D(x; sigma) - x) / sigma**2``. Normalised time ``t`` in [0, 1] maps to ``sigma`` through
the prior's own noise schedule (``Prior.sigma``); for Stable Diffusion ``t = step / 1000``.

Classifier-free guidance, one convention for the whole code base (the diffusers form):
``D_guided = D_uncond + guidance * (D_cond - D_uncond)``; guidance 1.0 is the plain conditional
denoiser. The paper's ``w`` is ``guidance - 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..devices import upload
from ..scene.cameras import Cameras


@dataclass
class Conditioning:
    """A prompt prepared once per job by a prior (text embeddings, or a mixture selection).

    ``data`` is prior-specific and opaque to methods. ``guidance`` is the default guidance scale
    (diffusers form) used by ``Prior.denoise`` when none is passed.
    """

    prompt: str
    negative_prompt: str = ""
    guidance: float = 7.5
    data: dict[str, Any] = field(default_factory=dict)


class Prior(ABC):
    """A denoiser of the data distribution: ``denoise(x_noisy, sigma, cond) -> x0_hat``."""

    #: True when ``x`` is a VAE latent (the prior owns its VAE).
    is_latent: bool = False

    @abstractmethod
    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level at normalised time ``t`` in [0, 1] (increasing in t)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map renders (B, 3, H, W) in [0, 1] to the prior's space, differentiably."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Map the prior's space back to images (B, 3, H, W) in [0, 1]."""
        return x

    @abstractmethod
    def condition(self, prompt: str, negative_prompt: str = "", guidance: float = 7.5) -> Conditioning:
        """Prepare a prompt once (text embeddings are computed here, not per step)."""

    @abstractmethod
    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                cameras: Cameras | None = None, guidance: float | None = None) -> torch.Tensor:
        """Guided estimate of the clean sample; ``sigma`` is a scalar or (B,) tensor."""


class ScoreModel(ABC):
    """The score model of the rendered images, ``D_phi``: same call as a prior, plus training."""

    #: False for models that do not learn (identity, exact empirical denoiser).
    trainable: bool = False

    @abstractmethod
    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                cameras: Cameras | None = None, x_clean: torch.Tensor | None = None) -> torch.Tensor:
        """Estimate of the clean render under the distribution of current renders.

        ``x_clean`` is the render the noisy sample was made from; only the identity model reads it.
        """

    def update(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
               cameras: Cameras | None = None) -> float | torch.Tensor:
        """One denoising-score-matching step on detached renders ``x`` at noise ``sigma``; its loss
        (a float, or a 0-dim tensor that the loop reads once the whole step is queued)."""
        return 0.0

    def state_dict(self) -> dict:
        """Trainable state for checkpoints (empty when nothing is learned)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


class IdentityScoreModel(ScoreModel):
    """``D_phi(x + sigma n; sigma) = x``: geometry tuning (DreamFlow stage 2a) and plain SDS.

    Returning the clean render (not the noisy input) is what "D_phi(x) = x for the given rendered
    image" means: in epsilon form it is ``eps_phi = n``, ProlificDreamer's SDS for geometry, and it
    keeps the sampled noise out of the update.
    """

    def denoise(self, x_noisy, sigma, cond, cameras=None, x_clean=None):
        """Return the clean render the noisy sample was made from."""
        if x_clean is None:
            raise ValueError("IdentityScoreModel needs x_clean, the render before noise was added")
        return x_clean


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) sigma to (B, 1, 1, 1...) matching ``x``."""
    s = sigma.to(x.dtype) if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=x.dtype)
    s = upload(s, x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, *([1] * (x.ndim - 1)))
