"""The reference-object prior: an exact denoiser whose data is a known textured mesh.

The data at camera ``c`` is ``N(mu_c, s^2 I)`` with ``mu_c`` the reference mesh rendered at ``c``
(over the same background the NeRF is expected to produce). Its denoiser is exact:
``D(x; sigma, c) = mu_c + s^2 / (s^2 + sigma^2) (x - mu_c)``. Running the 3D pipeline against it
must rebuild the reference, which measures every 3D part end to end (method.md). ``sigma(t)`` is
Stable Diffusion's table, so a schedule means the same noise levels as with the real prior.

The exact score model of the renders under this prior is the identity: for a fixed camera the
renders form a single point ``g(theta, c)``, whose denoiser at any noise level returns that point.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from ..export.mesh import MeshData
from ..scene.cameras import Cameras
from .base import Conditioning, Prior, as_sigma
from .noise_levels import stable_diffusion_noise_levels


class ReferenceRenderer:
    """Renders a reference mesh (texture or vertex colours) with the project's rasteriser."""

    def __init__(self, mesh: MeshData, vertex_colours: np.ndarray | None = None, background: float = 1.0,
                 supersample: int = 2, device: torch.device | str = "cpu", colours_from: str = ""):
        self.device = torch.device(device)
        self.colours_from = colours_from  # where the file's colour came from ("none": it had none), for the report
        self.mesh = mesh
        self.vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=self.device)
        self.faces = torch.as_tensor(mesh.faces, dtype=torch.long, device=self.device)
        self.uvs = None if mesh.uvs is None else torch.as_tensor(mesh.uvs, dtype=torch.float32, device=self.device)
        self.texture = None
        if mesh.texture is not None:
            self.texture = torch.as_tensor(mesh.texture[..., :3], device=self.device).float() / 255.0
        self.colours = None if vertex_colours is None else torch.as_tensor(vertex_colours, dtype=torch.float32, device=self.device)
        if self.texture is None and self.colours is None:
            self.colours = torch.full_like(self.vertices, 0.7)
        self.background = background
        # Supersampling, then box-filtering, gives a render whose edges average like a NeRF's pixels.
        self.supersample = supersample

    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] over the background, and coverage (B, 1, H, W)."""
        from ..render.raster import render_mesh

        width = height if width is None else width
        k = self.supersample
        out = render_mesh(self.vertices, self.faces, cameras.to(self.device), (height * k, width * k),
                          vertex_colors=self.colours, uvs=self.uvs if self.texture is not None else None,
                          texture=self.texture, background=self.background)
        image, alpha = out.image, out.alpha
        if k > 1:
            image = F.avg_pool2d(image, k)
            alpha = F.avg_pool2d(alpha, k)
        return image.clamp(0.0, 1.0), alpha


class ReferenceObjectPrior(Prior):
    """``D(x; sigma, c) = mu_c + s^2/(s^2 + sigma^2) (x - mu_c)`` for the reference render ``mu_c``."""

    is_latent = False

    def __init__(self, renderer: ReferenceRenderer, std: float = 0.05, cache_size: int = 8):
        self.renderer = renderer
        self.std = float(std)
        self.levels = stable_diffusion_noise_levels()
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def sigma(self, t):
        """Stable Diffusion's noise level at normalised time t."""
        return self.levels.sigma(t)

    def condition(self, prompt: str, negative_prompt: str = "", guidance: float = 7.5) -> Conditioning:
        """The reference needs no prompt; guidance has no meaning for a single exact denoiser."""
        return Conditioning(prompt, negative_prompt, guidance)

    def mean(self, cameras: Cameras, height: int, width: int) -> torch.Tensor:
        """The reference render ``mu_c`` (B, 3, H, W), cached for repeated calls with the same cameras."""
        key = (height, width, *(tuple(t.detach().cpu().tolist()) for t in
                                 (cameras.azimuth_deg, cameras.elevation_deg, cameras.distance, cameras.fovy_deg)))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        mu, _ = self.renderer.render(cameras, height, width)
        self._cache[key] = mu
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return mu

    @torch.no_grad()
    def denoise(self, x_noisy, sigma, cond, cameras=None, guidance=None):
        """The exact posterior mean of the clean render given the noisy one."""
        if cameras is None:
            raise ValueError("the reference-object prior needs the cameras of the renders")
        mu = self.mean(cameras, x_noisy.shape[-2], x_noisy.shape[-1]).to(x_noisy.device, x_noisy.dtype)
        s2 = self.std ** 2
        sig = as_sigma(sigma, x_noisy)
        return mu + (s2 / (s2 + sig * sig)) * (x_noisy - mu)
