"""Triangle-mesh formulas shared by the renderers, the exporters and the scene (torch; numpy
callers pass their arrays through ``torch.from_numpy``). The bottom layer: imports nothing of the
package."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (V, 3) of a triangle mesh (outward for CCW-outside faces);
    zero for a vertex that no face with an area touches. Differentiable; in ``vertices``' dtype."""
    faces = faces.long()
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    fn = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)
    n = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return F.normalize(n, dim=-1, eps=1e-20 if vertices.dtype == torch.float64 else 1e-12)
