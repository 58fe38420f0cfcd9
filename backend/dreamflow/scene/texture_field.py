"""The colour field of stages 2b and 3: hash grid + small MLP, evaluated at surface points.

The mesh is rasterised, the 3D surface point under each pixel is interpolated, and the field gives
its albedo. A field can start from the stage-1 NeRF's own colour network (threestudio does the
same when converting a NeRF into a mesh), so texture tuning begins from what stage 1 learned, or
be fitted to given surface colours (an artist's textured mesh).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .hashgrid import HashGridConfig, make_hash_grid

BOX_HALF = 0.5


class TextureField(nn.Module):
    """Albedo in [0, 1] at points (N, 3) in the object box: ``sigmoid(mlp(grid(x))[channels])``."""

    def __init__(self, grid: nn.Module, mlp: nn.Module, channels: slice = slice(0, 3)):
        super().__init__()
        self.grid = grid
        self.mlp = mlp
        self.start, self.stop = channels.start, channels.stop

    @classmethod
    def create(cls, grid_config: HashGridConfig, width: int = 32, device: torch.device | str = "cpu",
               seed: int = 0) -> "TextureField":
        """A fresh field with these hash-grid settings."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only; GPU streams untouched
            grid = make_hash_grid(grid_config, device, seed=seed)
            mlp = nn.Sequential(nn.Linear(grid.output_dim, width), nn.ReLU(), nn.Linear(width, 3)).to(device)
        return cls(grid, mlp)

    @classmethod
    def from_nerf(cls, field: nn.Module) -> "TextureField":
        """A copy of a NerfField's grid and MLP, reading its albedo channels (1..3)."""
        return cls(copy.deepcopy(field.grid), copy.deepcopy(field.mlp), slice(1, 4))

    def grid_parameters(self) -> list[nn.Parameter]:
        """Hash-table parameters (lr 1e-2 in the paper)."""
        return list(self.grid.parameters())

    def mlp_parameters(self) -> list[nn.Parameter]:
        """MLP parameters (lr 1e-3)."""
        return list(self.mlp.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Albedo (N, 3) at points (N, 3)."""
        if x.shape[0] == 0:
            return x.new_zeros(0, 3)
        u = (x / (2.0 * BOX_HALF) + 0.5).clamp(0.0, 1.0)
        return torch.sigmoid(self.mlp(self.grid(u))[:, self.start:self.stop].float())

    def fit(self, points: torch.Tensor, colours: torch.Tensor, steps: int = 200, lr: float = 1e-2,
            batch: int = 65536, seed: int = 0) -> float:
        """Regress the field onto given colours at given points (Adam); returns the final MSE."""
        opt = torch.optim.Adam([{"params": self.grid_parameters(), "lr": lr},
                                {"params": self.mlp_parameters(), "lr": lr * 0.1}])
        g = torch.Generator().manual_seed(seed)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            idx = torch.randint(0, points.shape[0], (min(batch, points.shape[0]),), generator=g).to(points.device)
            loss = (self(points[idx]) - colours[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())
