"""Texture baking: rasterise the UV layout in texture space, colour each texel from a 3D field.

Every texel covered by a triangle of the UV layout gets the colour field's value at the 3D point
with the same barycentric coordinates; empty texels then take the colour of the nearest covered
texel (seam dilation), so bilinear filtering and mip-maps never bleed background into a chart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from .mesh import MeshData


@torch.no_grad()
def texel_positions(mesh: MeshData, size: int, device: torch.device | str = "cpu") -> tuple[np.ndarray, torch.Tensor]:
    """Coverage mask (size, size) and 3D points (K, 3) of covered texels (row 0 = top = v 1)."""
    from ..render.raster import interpolate, rasterize

    dev = torch.device(device)
    uv = torch.as_tensor(mesh.uvs, dtype=torch.float32, device=dev)
    # UV square -> clip space, v up; the rasteriser puts clip y = +1 on image row 0.
    clip = torch.cat([uv * 2.0 - 1.0, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=1)[None]
    faces = torch.as_tensor(mesh.faces, dtype=torch.long, device=dev)
    rast = rasterize(clip, faces, size, size)
    pos = interpolate(torch.as_tensor(mesh.vertices, dtype=torch.float32, device=dev), rast)[0]
    mask = rast.mask[0]
    return mask.cpu().numpy(), pos[mask]


def dilate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill texels outside ``mask`` with the value of the nearest texel inside it."""
    if mask.all() or not mask.any():
        return image
    _, (iy, ix) = ndimage.distance_transform_edt(~mask, return_indices=True)
    return image[iy, ix]


@torch.no_grad()
def bake_texture(mesh: MeshData, colour_fn: Callable[[torch.Tensor], torch.Tensor], size: int,
                 device: torch.device | str = "cpu", chunk: int = 1 << 16) -> np.ndarray:
    """An (size, size, 3) uint8 texture for ``mesh`` (which must have UVs) from ``colour_fn(points)``."""
    if mesh.uvs is None:
        raise ValueError("baking needs a mesh with UVs (unwrap it first)")
    mask, pts = texel_positions(mesh, size, device)
    cols = torch.cat([colour_fn(pts[i:i + chunk]).float() for i in range(0, len(pts), chunk)]) if len(pts) else \
        torch.zeros(0, 3)
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[mask] = cols.clamp(0.0, 1.0).cpu().numpy()
    image = dilate(image, mask)
    return (image * 255.0 + 0.5).astype(np.uint8)
