"""Noise sources: fresh Gaussian noise each step, or FSD's deterministic world-map noise."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..devices import upload
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
        return upload(n, like.device).to(like.dtype)


class WorldMapNoise(NoiseSource):
    """FSD's deterministic noise ``eps(c)`` (Eq. 16 of the FSD paper).

    Drawn once from ``seed`` at the first call (when the latent size is known): a world map
    ``eps_p`` of size ``C x (map_scale h) x (2 map_scale w)`` spanning the polar angle 0..pi
    (rows) and the azimuth 0..2pi (columns), and a background map ``eps_b`` of one view's size.
    A view's foreground (opacity > ``alpha_threshold``, resized to the latent size) takes the
    ``h x w`` patch of the world map centred at ``(H polar / pi, W azimuth / 2pi)`` (wrapping in
    azimuth, clamped at the poles); its background takes ``eps_b``. The result is blended as
    ``sqrt(beta) * that + sqrt(1 - beta) * fresh``. Without cameras (2D particles) each batch slot
    keeps its own fixed noise, FSD's 2D setting.
    """

    def __init__(self, beta: float = 1.0, map_scale: float = 2.0, seed: int = 0, alpha_threshold: float = 0.5):
        if not 0.0 <= beta <= 1.0:
            raise ValueError("FSD's beta must lie in [0, 1]")
        if map_scale < 1.0:
            raise ValueError("the world map must be at least as large as one view (map_scale >= 1)")
        self.beta = float(beta)
        self.map_scale = float(map_scale)
        self.seed = int(seed)
        self.alpha_threshold = float(alpha_threshold)
        self.world: torch.Tensor | None = None       # (C, Hm, Wm)
        self.background: torch.Tensor | None = None  # (C, h, w)
        self.slots: torch.Tensor | None = None       # (B, C, h, w), no-camera mode

    def _maps(self, c: int, h: int, w: int) -> None:
        if self.world is not None and self.world.shape[0] == c and self.background is not None \
                and tuple(self.background.shape) == (c, h, w):
            return
        if self.world is not None:
            raise ValueError(f"WorldMapNoise was made for views of {tuple(self.background.shape)}, "
                             f"got {(c, h, w)}; use one noise source per resolution")
        g = torch.Generator().manual_seed(self.seed)
        hm = max(h, round(self.map_scale * h))
        wm = max(w, round(2.0 * self.map_scale * w))
        self.world = torch.randn(c, hm, wm, generator=g)
        self.background = torch.randn(c, h, w, generator=g)

    def patch(self, azimuth_deg: float, elevation_deg: float, h: int, w: int) -> torch.Tensor:
        """The world-map patch (C, h, w) for a camera direction."""
        assert self.world is not None
        _, hm, wm = self.world.shape
        polar = min(max(90.0 - elevation_deg, 0.0), 180.0)
        row = round(hm * polar / 180.0) - h // 2
        row = min(max(row, 0), hm - h)
        col = round(wm * ((azimuth_deg % 360.0) / 360.0)) - w // 2
        cols = (torch.arange(w) + col) % wm
        return self.world[:, row:row + h][:, :, cols]

    def sample(self, like, cameras, alpha, generator):
        """Deterministic per-camera noise, blended with fresh noise by beta."""
        b, c, h, w = like.shape
        if cameras is None:
            if self.slots is None or tuple(self.slots.shape) != (b, c, h, w):
                if self.slots is not None:
                    raise ValueError(f"WorldMapNoise fixed {tuple(self.slots.shape[:1])} slots, got a batch of {b}")
                g = torch.Generator().manual_seed(self.seed)
                self.slots = torch.randn(b, c, h, w, generator=g)
            fixed = self.slots
        else:
            if len(cameras) != b:
                raise ValueError(f"{len(cameras)} cameras for a batch of {b}")
            self._maps(c, h, w)
            az = cameras.azimuth_deg.detach().cpu().tolist()
            el = cameras.elevation_deg.detach().cpu().tolist()
            fore = torch.stack([self.patch(a, e, h, w) for a, e in zip(az, el)])
            if alpha is None:
                fixed = fore
            else:
                a = torch.nn.functional.interpolate(alpha.detach().float().cpu(), size=(h, w), mode="area")
                mask = (a > self.alpha_threshold).float()
                fixed = mask * fore + (1.0 - mask) * self.background[None]
        n = fixed
        if self.beta < 1.0:
            fresh = torch.randn(like.shape, generator=generator, dtype=torch.float32)
            n = math.sqrt(self.beta) * fixed + math.sqrt(1.0 - self.beta) * fresh
        return n.to(like.device, like.dtype)

    def state_dict(self):
        """The fixed maps, so a resumed job adds the same noise."""
        return {k: v.clone() for k, v in (("world", self.world), ("background", self.background),
                                          ("slots", self.slots)) if v is not None}

    def load_state_dict(self, state):
        """Restore the fixed maps."""
        self.world = state.get("world")
        self.background = state.get("background")
        self.slots = state.get("slots")
