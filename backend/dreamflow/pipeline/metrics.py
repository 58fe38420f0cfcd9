"""Quality measures of a result against a known reference: PSNR of views and relative Chamfer distance."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..export.measures import bbox_diagonal, chamfer_points, sample_barycentric, sample_surface  # noqa: F401 (their home is export.measures)
from ..export.mesh import MeshData
from ..scene.cameras import Cameras, orbit

#: Evaluation view size when the job's export settings give none.
EVAL_RESOLUTION = 128


def held_out_cameras(n: int = 8, elevation_deg: float = 15.0, distance: float = 1.2, fovy_deg: float = 50.0) -> Cameras:
    """Evaluation views: an orbit at the papers' evaluation elevation/distance, offset by half a step.

    Training cameras are drawn at random, so no evaluation view coincides with a training view.
    """
    cams = orbit(n, elevation_deg, distance, fovy_deg)
    return Cameras.make(cams.azimuth_deg + 180.0 / n, cams.elevation_deg, cams.distance, cams.fovy_deg)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (any matching shapes), over all pixels together."""
    mse = float(torch.mean((image.float().clamp(0, 1) - reference.float().clamp(0, 1)) ** 2))
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def chamfer_relative(mesh: MeshData, reference: MeshData, count: int = 20000, seed: int = 0) -> float:
    """Symmetric Chamfer distance relative to the reference's bounding-box diagonal.

    Definition: draw ``count`` points uniformly by area on each surface (A = mesh, B = reference);
    ``d(A->B)`` is the mean over A's points of the Euclidean distance to the nearest of B's points,
    and vice versa; Chamfer = ``(d(A->B) + d(B->A)) / 2``, divided by the length of the diagonal of
    the reference's axis-aligned bounding box.
    """
    a = sample_surface(mesh, count, seed)
    b = sample_surface(reference, count, seed + 1)
    return chamfer_points(a, b) / bbox_diagonal(reference.vertices)


def evaluate_mesh(ctx: Any, mesh: MeshData) -> dict[str, float]:
    """``psnr_db`` of held-out views of a textured mesh and its ``chamfer_rel`` against the job's reference.

    The one yardstick of every stage's mesh (stage 1's extracted mesh included) and of the final
    asset: held-out views at ``export.view_resolution``, rasterised over white.
    """
    from ..render.raster import render_mesh

    metrics = {"faces": float(len(mesh.faces)), "vertices": float(len(mesh.vertices))}
    if ctx.reference is None or mesh.texture is None or mesh.uvs is None:
        return metrics
    cams = held_out_cameras()
    res = int(getattr(ctx.config.export, "view_resolution", EVAL_RESOLUTION))
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=ctx.device)
    f = torch.as_tensor(mesh.faces, dtype=torch.long, device=ctx.device)
    uv = torch.as_tensor(mesh.uvs, dtype=torch.float32, device=ctx.device)
    tex = torch.as_tensor(mesh.texture[..., :3], device=ctx.device).float() / 255.0
    with torch.no_grad():
        img = render_mesh(v, f, cams.to(ctx.device), res, uvs=uv, texture=tex, background=1.0).image
    metrics["psnr_db"] = psnr(img.clamp(0, 1), ctx.reference.render(cams, res)[0])
    metrics["chamfer_rel"] = chamfer_relative(mesh, ctx.reference.mesh)
    return metrics
