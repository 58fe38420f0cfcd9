"""The stage-1 NeRF field: hash grid + small MLPs, albedo only (no shading, as the paper).

Density is ``softplus(raw + bias(x))`` with the paper's initial blob
``bias(x) = density_bias_scale * (1 - ||x|| / density_bias_radius)``, so optimisation starts from a
soft ball in the middle of the box [-0.5, 0.5]^3 instead of empty space. A background MLP on the
ray direction paints what the rays see behind the object. Normals for the orientation loss
(Ref-NeRF) are minus the normalised density gradient in closed form: the hash grid's trilinear
Jacobian carried forward through the MLP, one extra encoding of the surface samples where forward
differences took three (tinycudann's double backward is unsupported, so autograd could not). The
forward-difference normals remain as the reference they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .hashgrid import HashGridConfig, make_hash_grid

BOX_HALF = 0.5


@dataclass(frozen=True)
class FieldSettings:
    """The field's shape; the pipeline fills it from NerfStageConfig."""

    grid: HashGridConfig = HashGridConfig()
    mlp_width: int = 64
    density_bias_scale: float = 10.0
    density_bias_radius: float = 0.5
    background_width: int = 32
    background_frequencies: int = 4
    normal_eps: float = 0.01


def _mlp(inp: int, width: int, out: int, hidden_layers: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inp, width), nn.ReLU(inplace=True)]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class NerfField(nn.Module):
    """Density and albedo at points in [-0.5, 0.5]^3; background colour per ray direction."""

    def __init__(self, settings: FieldSettings = FieldSettings(), device: torch.device | str = "cpu",
                 grid_backend: str = "auto", seed: int = 0):
        super().__init__()
        self.settings = settings
        # MLP initialisation is part of the job's reproducibility, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only; GPU streams untouched
            self.grid = make_hash_grid(settings.grid, device, backend=grid_backend, seed=seed)
            self.mlp = _mlp(self.grid.output_dim, settings.mlp_width, 4, hidden_layers=1).to(device)
            enc_dim = 3 + 6 * settings.background_frequencies
            self.background_mlp = _mlp(enc_dim, settings.background_width, 3, hidden_layers=1).to(device)

    # -- parameters by learning-rate group -------------------------------------------------------
    def grid_parameters(self) -> list[nn.Parameter]:
        """Hash-table parameters (lr 1e-2 in the paper)."""
        return list(self.grid.parameters())

    def mlp_parameters(self) -> list[nn.Parameter]:
        """Density/colour MLP parameters (lr 1e-3)."""
        return list(self.mlp.parameters())

    def background_parameters(self) -> list[nn.Parameter]:
        """Background MLP parameters (lr 1e-3..1e-4)."""
        return list(self.background_mlp.parameters())

    # -- the field ---------------------------------------------------------------------------------
    def density_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's initial density blob ``scale * (1 - ||x|| / radius)``."""
        s = self.settings
        return s.density_bias_scale * (1.0 - x.norm(dim=-1) / s.density_bias_radius)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        u = (x / (2.0 * BOX_HALF) + 0.5).clamp(0.0, 1.0)
        return self.mlp(self.grid(u))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (N,) and albedo (N, 3) in [0, 1] at points (N, 3)."""
        raw = self._raw(x)
        sigma = F.softplus(raw[:, 0] + self.density_bias(x))
        return sigma, torch.sigmoid(raw[:, 1:4])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density (N,) at points (N, 3)."""
        return F.softplus(self._raw(x)[:, 0] + self.density_bias(x))

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        """Albedo (N, 3) in [0, 1] at points (N, 3)."""
        return torch.sigmoid(self._raw(x)[:, 1:4])

    def forward_with_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Density (N,), albedo (N, 3) and the density's exact spatial gradient (N, 3) at points (N, 3),
        all differentiable in the parameters: one encoding serves the values and the gradient."""
        u = x / (2.0 * BOX_HALF) + 0.5
        inside = ((u > 0.0) & (u < 1.0)).to(x.dtype)            # the clamp's derivative
        h, jac = self.grid.forward_with_jacobian(u.clamp(0.0, 1.0))
        # Rows d/dx, d/dy, d/dz (N, 3, D): each Linear is then one matrix product.
        jac = jac.transpose(1, 2) * (inside / (2.0 * BOX_HALF))[:, :, None]
        # Forward mode through the MLP: each Linear maps the Jacobian, each ReLU masks it; of the
        # last layer only the density row is needed.
        layers = list(self.mlp)
        for layer in layers[:-1]:
            if isinstance(layer, nn.Linear):
                h, jac = layer(h), jac @ layer.weight.T
            else:
                h = layer(h)
                jac = jac * (h > 0).to(jac.dtype)[:, None, :]
        last = layers[-1]
        raw = last(h)
        pre = raw[:, 0] + self.density_bias(x)
        s = self.settings
        bias_grad = -(s.density_bias_scale / s.density_bias_radius) * F.normalize(x, dim=-1, eps=1e-8)
        grad_pre = jac @ last.weight[0] + bias_grad
        return F.softplus(pre), torch.sigmoid(raw[:, 1:4]), torch.sigmoid(pre)[:, None] * grad_pre

    def density_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (N,) and its exact spatial gradient (N, 3) at points (N, 3), differentiable in the parameters."""
        sigma, _, grad = self.forward_with_gradient(x)
        return sigma, grad

    def normals(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Outward unit normals ``-grad sigma / |grad sigma|`` from the exact gradient, (N, 3);
        ``sigma`` (the density at ``x``) is what the finite-difference variant needs."""
        return -F.normalize(self.density_gradient(x)[1], dim=-1, eps=1e-8)

    def normals_finite_difference(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Outward unit normals by forward differences of step ``normal_eps`` around ``sigma`` (three
        more density evaluations), (N, 3): the reference the exact normals are tested against."""
        eps = self.settings.normal_eps
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps
        shifted = (x[:, None, :] + offsets[None]).reshape(-1, 3)
        grad = (self.density(shifted).view(-1, 3) - sigma[:, None]) / eps
        return -F.normalize(grad, dim=-1, eps=1e-8)

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Background colour (N, 3) in [0, 1] for unit ray directions (N, 3)."""
        feats = [directions]
        for k in range(self.settings.background_frequencies):
            feats += [torch.sin((2.0 ** k) * torch.pi * directions), torch.cos((2.0 ** k) * torch.pi * directions)]
        return torch.sigmoid(self.background_mlp(torch.cat(feats, dim=-1)))
