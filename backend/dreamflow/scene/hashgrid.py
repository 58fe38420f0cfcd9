"""Multi-resolution hash-grid encoding (Instant NGP), with tinycudann's numbers in pure PyTorch.

:class:`TorchHashGrid` follows tinycudann's "HashGrid" encoding exactly, so that parameters can be
copied between the two and give the same output: level ``l`` has the scale
``base * b**l - 1`` with ``b = exp(ln(max / base) / (levels - 1))``, resolution
``ceil(scale) + 1``; a point ``x`` in [0, 1]^3 sits at ``x * scale + 0.5`` in grid units; a level
whose dense grid fits into its table is indexed densely, otherwise by the spatial hash
``x ^ (y * 2654435761) ^ (z * 805459861)`` modulo the table size; corners are blended
trilinearly; parameters start uniform in [-1e-4, 1e-4]; features are concatenated level by level.
:func:`make_hash_grid` picks tinycudann on CUDA when it is installed (``dreamflow.accel``) and this
twin otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import accel
from ..config import setting

#: The spatial-hash primes of Instant NGP (one per dimension; the first is 1 for coherence).
HASH_PRIMES = (1, 2654435761, 805459861)


def per_level_scale(levels: int, base_resolution: int, max_resolution: int) -> float:
    """Growth factor b between levels so that the finest level reaches ``max_resolution``."""
    if levels <= 1:
        return 1.0
    return math.exp(math.log(max_resolution / base_resolution) / (levels - 1))


def level_scales(levels: int, base_resolution: int, scale_factor: float) -> list[float]:
    """tinycudann's per-level scale ``base * b**l - 1`` (float32 arithmetic, as on the GPU)."""
    log2_b = math.log2(scale_factor)
    return [float(torch.tensor(2.0 ** (l * log2_b), dtype=torch.float32) * base_resolution - 1.0) for l in range(levels)]


def level_layout(levels: int, log2_table_size: int, base_resolution: int, scale_factor: float) -> list[tuple[float, int, int]]:
    """Per level: (scale, resolution, table size) with tinycudann's rounding to multiples of 8."""
    out = []
    for scale in level_scales(levels, base_resolution, scale_factor):
        res = int(math.ceil(scale)) + 1
        dense = res ** 3
        size = min(((dense + 7) // 8) * 8, 1 << log2_table_size)
        out.append((scale, res, size))
    return out


class TorchHashGrid(nn.Module):
    """Pure-PyTorch hash grid; input (N, 3) in [0, 1], output (N, levels * features)."""

    def __init__(self, levels: int = 16, log2_table_size: int = 19, features_per_level: int = 2,
                 base_resolution: int = 16, max_resolution: int = 2048, init_scale: float = 1e-4,
                 seed: int | None = None):
        super().__init__()
        self.levels = levels
        self.features_per_level = features_per_level
        self.scale_factor = per_level_scale(levels, base_resolution, max_resolution)
        layout = level_layout(levels, log2_table_size, base_resolution, self.scale_factor)
        self.scales = [s for s, _, _ in layout]
        self.resolutions = [r for _, r, _ in layout]
        self.table_sizes = [n for _, _, n in layout]
        offsets = [0]
        for n in self.table_sizes:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.dense_levels = sum(1 for r, size in zip(self.resolutions, self.table_sizes) if r ** 3 <= size)
        # Per-level constants as buffers: they follow .to(device) and cost no host-to-device copy
        # per call (non-persistent: the parameter layout alone is the grid's state).
        for name, values, dtype in (("level_scale", self.scales, torch.float32), ("level_size", self.table_sizes, torch.long),
                                    ("level_resolution", self.resolutions, torch.long),
                                    ("level_offset", offsets[:-1], torch.long)):
            self.register_buffer(name, torch.tensor(values, dtype=dtype), persistent=False)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        # One flat parameter laid out like tinycudann's: level after level, F features per entry.
        self.params = nn.Parameter((torch.rand(offsets[-1] * features_per_level, generator=g) * 2.0 - 1.0) * init_scale)

    @property
    def output_dim(self) -> int:
        """Number of output features."""
        return self.levels * self.features_per_level

    def _group(self, x: torch.Tensor, levels: range, hashed: bool,
               with_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows (N, len(levels), 8) and trilinear weights (same shape) for a group of levels;
        with ``with_gradient`` the weights come with their derivatives along x, y, z, (N, len(levels), 8, 4).

        Per-dimension terms are combined by broadcasting (2 x 2 x 2 corners), which is far
        cheaper on a CPU than building the eight corner coordinates explicitly.
        """
        part = slice(levels.start, levels.stop)
        pos = x[:, None, :] * self.level_scale[part][None, :, None] + 0.5                       # (N, G, 3)
        base = torch.floor(pos)
        frac = pos - base
        base = base.long()
        w1 = torch.stack([1.0 - frac, frac], dim=-1)                            # (N, G, 3, 2)
        c = torch.stack([base, base + 1], dim=-1)                               # (N, G, 3, 2)
        if with_gradient:
            # Per axis four channels (the weight, then its derivative along x, y, z): a linear
            # weight's derivative along its own axis is -1 / +1 times the level's scale (grid units
            # per unit of x), along the other axes the weight itself. Their products are the
            # weights and their gradient, in the same two multiplications as the weights alone.
            slope = (torch.tensor([-1.0, 1.0], device=x.device)[None, None, :]
                     * self.level_scale[part][None, :, None]).expand(x.shape[0], -1, -1)
            channels = [torch.stack([w1[:, :, d]] + [slope if k == d else w1[:, :, d] for k in range(3)], dim=-1)
                        for d in range(3)]                                    # 3 x (N, G, 2, 4)
            w1 = torch.stack(channels, dim=2)                                 # (N, G, 3, 2, 4)
        w = w1[:, :, 0, :, None, None] * w1[:, :, 1, None, :, None] * w1[:, :, 2, None, None, :]
        # Per-dimension terms (N, G, 2) are formed in int64; the eight-corner arrays, the large
        # ones, in int32 (every table row index is below 2^31), which halves their memory traffic.
        sizes = self.level_size[part][None, :, None]
        offsets = self.level_offset[part][None, :, None]
        if hashed:
            # uint32 products wrap modulo 2^32 before the XOR, as in CUDA; a hashed level's table
            # is exactly 2^log2 entries, so the modulo is a mask, and masking each term before
            # the XOR gives the same bits: (a ^ b ^ c) & m == (a & m) ^ (b & m) ^ (c & m).
            mask = sizes - 1
            hx, hy, hz = ((c[:, :, d] * HASH_PRIMES[d]) & mask for d in range(3))
            idx = hx.int()[:, :, :, None, None] ^ hy.int()[:, :, None, :, None] ^ hz.int()[:, :, None, None, :]
            idx = idx + offsets.int()[..., None, None]
        else:
            res = self.level_resolution[part][None, :, None]
            ix = (c[:, :, 0] + offsets).int()  # the level's offset rides on the smallest term
            iy = (c[:, :, 1] * res).int()
            iz = (c[:, :, 2] * (res * res)).int()
            idx = ix[:, :, :, None, None] + iy[:, :, None, :, None] + iz[:, :, None, None, :]
            # Corners one past the far face overflow the dense table by less than its size.
            end = (offsets + sizes).int()[..., None, None]
            idx = torch.where(idx >= end, idx - sizes.int()[..., None, None], idx)
        return idx.reshape(x.shape[0], len(levels), 8), w1

    def _corners(self, x: torch.Tensor, params: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The corner features (N, L, 8, F) of every level (from ``params``, default this grid's) and
        the per-axis linear weights (N, L, 3, 2)."""
        n = x.shape[0]
        table = (self.params if params is None else params).view(-1, self.features_per_level)
        parts = [self._group(x, group, hashed)
                 for group, hashed in ((range(0, self.dense_levels), False), (range(self.dense_levels, self.levels), True))
                 if len(group)]
        idx, w1 = (torch.cat(t, dim=1) if len(t) > 1 else t[0] for t in zip(*parts))
        # One gather for all levels, with an int64 index: its backward then takes the parallel
        # scatter-add path on CPU (an int32 index made it 5x slower).
        vals = table.index_select(0, idx.reshape(-1).long()).view(n, self.levels, 8, self.features_per_level)
        return vals, w1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points ``x`` (N, 3) in [0, 1]^3."""
        x = x.float()
        vals, w1 = self._corners(x)
        w = (w1[:, :, 0, :, None, None] * w1[:, :, 1, None, :, None] * w1[:, :, 2, None, None, :]).flatten(2)
        return torch.einsum("nlkf,nlk->nlf", vals, w).reshape(x.shape[0], self.output_dim)

    def forward_with_jacobian(self, x: torch.Tensor, params: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) of points ``x`` (N, 3) in [0, 1]^3 and their closed-form Jacobian (N, D, 3).

        Inside a cell trilinear interpolation is linear along each axis, so its derivative along x
        is the level's scale times the bilinear (y, z) blend of the corner differences across x
        (likewise y, z): exact (what autograd gives; undefined only on cell faces), from the same
        gather as the values, not three more encodings as finite differences would take. It stays
        differentiable in the table (``params``: another table of this layout, e.g. tinycudann's;
        default this grid's).
        """
        x = x.float()
        n = x.shape[0]
        vals, w1 = self._corners(x, params)
        v = vals.view(n, self.levels, 2, 2, 2, self.features_per_level)         # corners x, y, z
        wx = w1[:, :, 0, :, None]                                               # (N, L, 2, 1)
        wy = w1[:, :, 1, None, :, None]                                         # (N, L, 1, 2, 1)
        wz = w1[:, :, 2, None, None, :, None]                                   # (N, L, 1, 1, 2, 1)
        along_z = (v * wz).sum(4)                                               # (N, L, 2, 2, F)
        along_yz = (along_z * wy).sum(3)                                        # (N, L, 2, F)
        out = (along_yz * wx).sum(2)                                            # (N, L, F)
        scale = self.level_scale[None, :, None]
        d_x = (along_yz[:, :, 1] - along_yz[:, :, 0]) * scale
        d_y = ((along_z[:, :, :, 1] - along_z[:, :, :, 0]) * wx).sum(2) * scale
        d_z = (((v[:, :, :, :, 1] - v[:, :, :, :, 0]) * wy).sum(3) * wx).sum(2) * scale
        return out.reshape(n, self.output_dim), torch.stack([d_x, d_y, d_z], dim=-1).reshape(n, self.output_dim, 3)


class TcnnHashGrid(nn.Module):
    """tinycudann's HashGrid with the same configuration and parameter layout (CUDA only)."""

    def __init__(self, tcnn, levels: int, log2_table_size: int, features_per_level: int,
                 base_resolution: int, max_resolution: int, seed: int = 1337):
        super().__init__()
        self.levels = levels
        self.features_per_level = features_per_level
        self.scale_factor = per_level_scale(levels, base_resolution, max_resolution)
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": levels, "n_features_per_level": features_per_level,
            "log2_hashmap_size": log2_table_size, "base_resolution": base_resolution,
            "per_level_scale": self.scale_factor, "interpolation": "Linear",
        }, seed=seed, dtype=torch.float32)
        # The twin's indexing and weights over this encoding's own table give the closed-form
        # Jacobian that tinycudann lacks (same layout, same numbers); the twin keeps no table.
        self.twin = TorchHashGrid(levels, log2_table_size, features_per_level, base_resolution, max_resolution,
                                  init_scale=0.0)
        self.twin.params = None

    @property
    def params(self) -> nn.Parameter:
        """The flat parameter vector (same layout as TorchHashGrid.params)."""
        return self.encoding.params

    @property
    def output_dim(self) -> int:
        """Number of output features."""
        return self.levels * self.features_per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points ``x`` (N, 3) in [0, 1]^3."""
        if x.shape[0] == 0:
            # tinycudann's grid backward returns before zeroing its gradient buffer for an empty
            # batch, so an empty call would add uninitialised memory to the table's gradient
            # (a ray chunk that misses every occupied cell does this). No points, no graph.
            return self.params.new_zeros(0, self.output_dim)
        return self.encoding(x.float().contiguous()).float()

    def forward_with_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and their closed-form Jacobian (N, D, 3), by the twin on this table."""
        return self.twin.forward_with_jacobian(x, params=self.params.float())


@dataclass(frozen=True)
class HashGridConfig:
    """Multi-resolution hash grid (Instant NGP); the paper's stage-1 values are the defaults."""

    levels: int = setting(16, 1, 32)
    log2_table_size: int = setting(19, 8, 24)
    features_per_level: int = setting(4, 1, 8)
    base_resolution: int = setting(16, 1, 4096)
    max_resolution: int = setting(2048, 1, 16384)


def make_hash_grid(config: HashGridConfig, device: torch.device | str, backend: str = "auto",
                   seed: int = 0) -> nn.Module:
    """The hash grid for ``device``: tinycudann where available (``backend='auto'``), else the twin.

    ``backend`` may force ``"torch"`` or ``"tcnn"`` (the latter raises when tinycudann is absent).
    """
    args = asdict(config)
    tcnn = accel.tinycudann(device) if backend in ("auto", "tcnn") else None
    if backend == "tcnn" and tcnn is None:
        raise RuntimeError("the tinycudann hash grid was requested but tinycudann/CUDA is not available")
    if tcnn is not None:
        return TcnnHashGrid(tcnn, seed=seed + 1337, **args).to(device)
    return TorchHashGrid(seed=seed, **args).to(device)


def available_backends(device: torch.device | str) -> list[str]:
    """Hash-grid backends usable on ``device`` ("torch" always, "tcnn" where it exists)."""
    out = ["torch"]
    if accel.tinycudann(device) is not None:
        out.append("tcnn")
    return out
