"""Volume rendering of a NeRF field with empty-space skipping, in plain PyTorch (CPU and CUDA).

Why not a library: nerfacc (the maintained NeRF acceleration toolbox) implements its ray marching
and occupancy-grid traversal as CUDA kernels only, so it cannot serve the CPU previews this
project promises; the few operations needed here are short in PyTorch.

Rays are cut to the box [-0.5, 0.5]^3, sampled at ``samples`` stratified depths, and only the
samples whose cell of the :class:`OccupancyGrid` is marked occupied are sent through the field
(the others get zero density). Alpha compositing then gives the image over the background, the
opacity, the expected depth and the Ref-NeRF orientation loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..scene.cameras import Cameras

BOX_HALF = 0.5


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, half: float = BOX_HALF) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances (N,) of rays through the cube [-half, half]^3 (exit <= entry: miss)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-half - origins) * inv
    t1 = (half - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


class OccupancyGrid(nn.Module):
    """A coarse R^3 grid over the box marking where the density is worth evaluating.

    Every refresh evaluates the density at one jittered point per cell and keeps
    ``max(decay * old, new)`` (an EMA that forgets slowly, Instant NGP's rule); a cell is occupied
    when that value exceeds ``min(threshold, mean)`` (so that a field that is faint everywhere, the
    start of a run, is never skipped entirely), or when a neighbouring cell does.
    """

    def __init__(self, resolution: int = 64, threshold: float = 0.5, decay: float = 0.9,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.resolution = resolution
        self.threshold = threshold
        self.decay = decay
        # Everything counts as occupied until the first refresh has seen the field.
        self.register_buffer("values", torch.zeros((resolution,) * 3, device=device))
        self.register_buffer("mask", torch.ones((resolution,) * 3, dtype=torch.bool, device=device))
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long, device=device))

    def cell_centres(self) -> torch.Tensor:
        """World coordinates of all cell centres, (R^3, 3), x fastest-varying last."""
        r = self.resolution
        ax = (torch.arange(r, device=self.values.device, dtype=torch.float32) + 0.5) / r - 0.5
        return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3) * (2 * BOX_HALF)

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator | None = None,
               chunk: int = 1 << 16) -> None:
        """Refresh the grid from ``density_fn(points (N, 3)) -> (N,)``."""
        r = self.resolution
        pts = self.cell_centres()
        jitter = (torch.rand(pts.shape, generator=generator, device=pts.device) - 0.5) * (2 * BOX_HALF / r)
        pts = pts + jitter
        new = torch.cat([density_fn(pts[i:i + chunk]) for i in range(0, len(pts), chunk)]).view(r, r, r)
        self.values.copy_(new if int(self.refreshes) == 0 else torch.maximum(self.values * self.decay, new))
        self.refreshes += 1
        thr = min(self.threshold, float(self.values.mean()))
        # One jittered probe per cell can miss a thin sliver of surface: grow the mask by a cell.
        occupied = (self.values > thr).float()[None, None]
        self.mask.copy_(torch.nn.functional.max_pool3d(occupied, 3, stride=1, padding=1)[0, 0] > 0)

    def query(self, points: torch.Tensor) -> torch.Tensor:
        """Occupancy (bool) of the cells containing ``points`` (..., 3); outside the box is False."""
        r = self.resolution
        idx = ((points / (2 * BOX_HALF) + 0.5) * r).floor().long()
        inside = ((idx >= 0) & (idx < r)).all(-1)
        idx = idx.clamp(0, r - 1)
        return self.mask[idx[..., 0], idx[..., 1], idx[..., 2]] & inside

    def occupied_fraction(self) -> float:
        """Share of cells marked occupied."""
        return float(self.mask.float().mean())


@dataclass
class VolumeOutput:
    """Per-ray results, each (N, ...); ``orientation`` is a scalar (mean over rays)."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    orientation: torch.Tensor
    samples_evaluated: int


def render_rays(field, origins: torch.Tensor, dirs: torch.Tensor, samples: int,
                occupancy: OccupancyGrid | None = None, perturb: bool = True,
                generator: torch.Generator | None = None, orientation: bool = False,
                background: torch.Tensor | None = None, orientation_min_weight: float = 1e-2) -> VolumeOutput:
    """Composite ``field`` along rays (N, 3) with ``samples`` stratified samples in the box.

    ``field(points) -> (density, albedo)``; ``field.background(dirs)`` gives the background unless
    ``background`` (N, 3) or (3,) is passed. Gradients flow to the field's parameters.
    """
    n = origins.shape[0]
    dev = origins.device
    near, far = ray_box(origins, dirs)
    hit = far > near
    far = torch.where(hit, far, near)
    # The jitter is drawn where it is used: at the paper's settings it is 33 M numbers a render.
    u = torch.rand((n, samples), generator=generator, device=dev) if perturb else torch.full((n, samples), 0.5, device=dev)
    steps = (torch.arange(samples, device=dev, dtype=torch.float32)[None] + u) / samples
    span = (far - near)[:, None]
    t = near[:, None] + span * steps                                # (N, S)
    delta = span.expand(-1, samples) / samples
    pts = origins[:, None, :] + t[..., None] * dirs[:, None, :]     # (N, S, 3)
    keep = hit[:, None].expand(-1, samples)
    if occupancy is not None:
        keep = keep & occupancy.query(pts)
    flat = keep.reshape(-1).nonzero(as_tuple=True)[0]
    sel_pts = pts.reshape(-1, 3)[flat]
    sigma_sel, rgb_sel = field(sel_pts)
    sigma = torch.zeros(n * samples, device=dev, dtype=sigma_sel.dtype).index_copy(0, flat, sigma_sel).view(n, samples)
    rgb = torch.zeros(n * samples, 3, device=dev, dtype=rgb_sel.dtype).index_copy(0, flat, rgb_sel).view(n, samples, 3)
    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones(n, 1, device=dev), 1.0 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    weights = alpha * trans
    opacity = weights.sum(1)
    colour = (weights[..., None] * rgb).sum(1)
    depth = (weights * t).sum(1)
    if background is None:
        background = field.background(dirs)
    colour = colour + (1.0 - opacity)[:, None] * background
    orient = torch.zeros((), device=dev)
    if orientation and flat.numel() > 0:
        # Normals cost one more encoding (with its Jacobian) per point: only where the weight is visible.
        w_sel = weights.reshape(-1)[flat]
        near_surface = (w_sel.detach() > orientation_min_weight).nonzero(as_tuple=True)[0]
        if near_surface.numel() > 0:
            normals = field.normals(sel_pts[near_surface], sigma_sel[near_surface])
            d = dirs[:, None, :].expand(-1, samples, -1).reshape(-1, 3)[flat[near_surface]]
            facing_away = torch.relu((normals * d).sum(-1)) ** 2
            orient = (w_sel[near_surface] * facing_away).sum() / n
    return VolumeOutput(colour, opacity, depth, orient, int(flat.numel()))


@dataclass
class VolumeImages:
    """A batch of rendered images: image (B, 3, H, W), alpha/depth (B, 1, H, W), orientation scalar."""

    image: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    orientation: torch.Tensor
    samples_evaluated: int


def render_cameras(field, cameras: Cameras, height: int, width: int, samples: int,
                   occupancy: OccupancyGrid | None = None, perturb: bool = True,
                   generator: torch.Generator | None = None, orientation: bool = False,
                   background: torch.Tensor | None = None, chunk: int | None = None) -> VolumeImages:
    """Render whole images of ``cameras``; ``chunk`` rays at a time (None: all at once)."""
    o, d = cameras.rays(height, width)
    b = len(cameras)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    bg = None
    if background is not None:
        bg = background.to(o.device).reshape(-1, 3).expand(o.shape[0], 3)
    step = chunk or o.shape[0]
    parts = [render_rays(field, o[i:i + step], d[i:i + step], samples, occupancy, perturb, generator, orientation,
                         None if bg is None else bg[i:i + step]) for i in range(0, o.shape[0], step)]
    rgb = torch.cat([p.rgb for p in parts]).view(b, height, width, 3).permute(0, 3, 1, 2)
    opacity = torch.cat([p.opacity for p in parts]).view(b, 1, height, width)
    depth = torch.cat([p.depth for p in parts]).view(b, 1, height, width)
    orient = sum(p.orientation * p.rgb.shape[0] for p in parts) / o.shape[0]
    return VolumeImages(rgb, opacity, depth, orient, sum(p.samples_evaluated for p in parts))
