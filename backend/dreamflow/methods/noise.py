"""Noise sources: fresh Gaussian noise each step, or FSD's deterministic world-map noise."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..scene.cameras import Cameras


class NoiseSource(ABC):
    """Gives the unit-variance noise ``n`` added to the render for one iteration."""

    @abstractmethod
    def sample(self, like: torch.Tensor, cameras: Cameras | None, alpha: torch.Tensor | None,
               generator: torch.Generator | None) -> torch.Tensor:
        """Noise with the shape, dtype and device of ``like``."""

    def state_dict(self) -> dict:
        """Fixed noise maps that must survive a resume (none for fresh noise)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


class FreshNoise(NoiseSource):
    """``n ~ N(0, I)`` drawn anew every call (APFO, SDS, VSD)."""

    def sample(self, like, cameras, alpha, generator):
        """A fresh standard normal draw."""
        n = torch.randn(like.shape, generator=generator, dtype=torch.float32)
        return n.to(like.device, like.dtype)
