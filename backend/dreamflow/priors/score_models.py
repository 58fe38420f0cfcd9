"""Score models of the renders, ``D_phi``: the exact empirical one and the LoRA one.

``EmpiricalScoreModel`` is exact: the denoiser of the empirical distribution of the current
renders (particles), each smoothed by a Gaussian kernel of width ``std``; it is what a perfectly
trained VSD/APFO score model would be, so on an analytic prior the methods can be checked
without training noise. ``LoraScoreModel`` is the practical one (ProlificDreamer, DreamFlow): a
LoRA adapter on the prior's own UNet, trained with the denoising loss on the renders.
"""

from __future__ import annotations

import torch

from ..scene.cameras import Cameras
from .base import Conditioning, ScoreModel
from .gmm import mixture_denoise


class EmpiricalScoreModel(ScoreModel):
    """Exact denoiser of ``(1/P) sum_j N(x_j, std^2 I)`` over the current renders ``x_j``.

    The current batch (``x_clean`` in :meth:`denoise`) always takes part. With ``memory > 0`` the
    model also keeps the last ``memory`` renders passed to :meth:`update` (the loop calls it,
    since the model is then ``trainable``), so that a 3D run with one view per step still sees a
    distribution of renders, not a single point.
    """

    def __init__(self, std: float, memory: int = 0):
        if std <= 0:
            raise ValueError("the kernel width std must be positive")
        self.std = float(std)
        self.memory = int(memory)
        self.trainable = self.memory > 0
        self.bank: torch.Tensor | None = None

    def update(self, x, sigma, cond, cameras=None):
        """Remember the detached renders (first in, first out); nothing is learned."""
        if self.memory <= 0:
            return 0.0
        x = x.detach()
        self.bank = x if self.bank is None else torch.cat([x, self.bank.to(x.device, x.dtype)])
        self.bank = self.bank[: self.memory]
        return 0.0

    def denoise(self, x_noisy, sigma, cond, cameras=None, x_clean=None):
        """Exact denoiser of the kernel-smoothed empirical distribution of the renders."""
        parts = [p for p in (x_clean, self.bank) if p is not None]
        if not parts:
            raise ValueError("EmpiricalScoreModel needs the current renders (x_clean) or a filled memory")
        particles = torch.cat([p.detach().to(x_noisy.device, x_noisy.dtype) for p in parts])
        log_w = torch.zeros(particles.shape[0], dtype=torch.float64)
        return mixture_denoise(x_noisy, torch.as_tensor(sigma), particles, log_w, self.std)

    def state_dict(self):
        """The memory of renders (empty without memory)."""
        return {} if self.bank is None else {"bank": self.bank.clone()}

    def load_state_dict(self, state):
        """Restore the memory."""
        self.bank = state.get("bank")
