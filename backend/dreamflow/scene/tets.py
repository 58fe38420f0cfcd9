"""A tetrahedral grid generated in code, and marching tetrahedra on it.

The grid is the Freudenthal (Kuhn) triangulation of a regular lattice: every cube of the lattice
is cut into the six tetrahedra that share its main diagonal, one per ordering of the three axes.
All cubes are cut the same way, so neighbouring tetrahedra meet face to face and the triangulation
is conforming: a surface extracted from it is closed wherever the zero level set does not leave
the grid. No precomputed tables are downloaded.

Marching tetrahedra places one vertex on every grid edge whose endpoints have SDF values of
opposite sign, by linear interpolation, so the vertex positions are differentiable in the SDF
values and in the (deformed) grid positions. A vertex is shared by every tetrahedron around its
edge, which is what makes the mesh indexed and watertight. Triangles are oriented so that their
normals point from the inside (negative SDF) to the outside.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

#: The six edges of a tetrahedron as pairs of its local vertex indices.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


@dataclass
class TetGrid:
    """Lattice vertices (N+1)^3 x 3 in ``[lo, hi]^3`` and tetrahedra (6 N^3, 4)."""

    vertices: torch.Tensor
    tets: torch.Tensor
    resolution: int
    lo: float
    hi: float

    @property
    def spacing(self) -> float:
        """Edge length of one lattice cube."""
        return (self.hi - self.lo) / self.resolution

    def lattice(self, values: torch.Tensor) -> torch.Tensor:
        """Per-vertex values (Nv, ...) viewed as an (N+1, N+1, N+1, ...) array indexed [x, y, z]."""
        n = self.resolution + 1
        return values.reshape(n, n, n, *values.shape[1:])


def make_tet_grid(resolution: int, lo: float = -0.55, hi: float = 0.55, device: torch.device | str = "cpu") -> TetGrid:
    """The Freudenthal tetrahedral grid with ``resolution`` cubes per axis over ``[lo, hi]^3``."""
    if resolution < 1:
        raise ValueError("tet_resolution must be at least 1")
    n = resolution
    axis = torch.linspace(lo, hi, n + 1, device=device)
    gx, gy, gz = torch.meshgrid(axis, axis, axis, indexing="ij")
    vertices = torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)
    idx = torch.arange(n, device=device)
    cx, cy, cz = torch.meshgrid(idx, idx, idx, indexing="ij")
    corner = torch.stack([cx, cy, cz], dim=-1).reshape(-1, 3)           # (n^3, 3)
    stride = torch.tensor([(n + 1) ** 2, n + 1, 1], device=device)
    unit = torch.eye(3, dtype=torch.long, device=device)
    tets = []
    for perm in itertools.permutations(range(3)):
        p0 = corner
        p1 = p0 + unit[perm[0]]
        p2 = p1 + unit[perm[1]]
        p3 = p2 + unit[perm[2]]
        tets.append(torch.stack([(p * stride).sum(-1) for p in (p0, p1, p2, p3)], dim=-1))
    tets = torch.cat(tets, dim=0)
    # Give every tetrahedron positive orientation so that later geometric checks read one way.
    v = vertices[tets]
    vol = torch.linalg.det(torch.stack([v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], v[:, 3] - v[:, 0]], dim=1))
    flip = vol < 0
    tets[flip] = tets[flip][:, [0, 2, 1, 3]]
    return TetGrid(vertices, tets, n, lo, hi)


def _triangle_table() -> torch.Tensor:
    """(16, 2, 3): per inside/outside pattern, up to two triangles as local edge indices (-1: none).

    One vertex alone on its side gives one triangle on its three edges; two against two give the
    quad on the four crossing edges, in cyclic order, split into two triangles. Orientation is
    fixed later from the geometry.
    """
    edge_id = {frozenset(e): k for k, e in enumerate(TET_EDGES)}
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    for case in range(16):
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if len(inside) in (1, 3):
            lone = inside[0] if len(inside) == 1 else outside[0]
            others = [i for i in range(4) if i != lone]
            table[case, 0] = torch.tensor([edge_id[frozenset((lone, o))] for o in others])
        elif len(inside) == 2:
            (i, j), (k, l) = inside, outside
            ring = [edge_id[frozenset(p)] for p in ((i, k), (i, l), (j, l), (j, k))]
            table[case, 0] = torch.tensor([ring[0], ring[1], ring[2]])
            table[case, 1] = torch.tensor([ring[0], ring[2], ring[3]])
    return table


_TABLE = _triangle_table()


def marching_tets(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero level set of ``sdf`` on a tetrahedral mesh: (vertices (M, 3), faces (K, 3) int64).

    Inside is ``sdf < 0``. Vertex positions are differentiable in ``vertices`` and ``sdf``.
    """
    device = vertices.device
    with torch.no_grad():
        occ = sdf.detach() < 0
        occ_t = occ[tets]                                         # (T, 4)
        count = occ_t.sum(1)
        active = (count > 0) & (count < 4)
        tets_a = tets[active]
        if tets_a.shape[0] == 0:
            return vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device)
        local = torch.tensor(TET_EDGES, device=device)
        edges = tets_a[:, local]                                  # (Ta, 6, 2)
        edges = torch.sort(edges, dim=-1).values
        crossing = occ[edges[..., 0]] != occ[edges[..., 1]]
        nv = vertices.shape[0]
        key = edges[..., 0] * nv + edges[..., 1]
        uniq, inverse = torch.unique(key[crossing], return_inverse=True)
        edge_vertex = torch.full(key.shape, -1, dtype=torch.long, device=device)
        edge_vertex[crossing] = inverse
        a, b = uniq // nv, uniq % nv
        case = (occ_t[active].long() * torch.tensor([1, 2, 4, 8], device=device)).sum(1)
        tri_local = _TABLE.to(device)[case]                       # (Ta, 2, 3)
        has = tri_local[..., 0] >= 0                              # (Ta, 2)
        rows = torch.arange(tets_a.shape[0], device=device)[:, None].expand(-1, 2)[has]
        faces = torch.gather(edge_vertex[rows], 1, tri_local[has])
    sa, sb = sdf[a], sdf[b]
    denom = sb - sa
    wa = sb / denom
    out_v = vertices[a] * wa[:, None] + vertices[b] * (1.0 - wa)[:, None]
    with torch.no_grad():
        # Orient each triangle so that its normal points from the inside corners to the outside ones.
        tv = vertices.detach()[tets_a[rows]]                      # (K, 4, 3)
        inside_w = occ_t[active][rows].to(tv.dtype)
        c_in = (tv * inside_w[..., None]).sum(1) / inside_w.sum(1, keepdim=True)
        c_out = (tv * (1 - inside_w)[..., None]).sum(1) / (1 - inside_w).sum(1, keepdim=True)
        p = out_v.detach()[faces]
        normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
        flip = (normal * (c_out - c_in)).sum(-1) < 0
        faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return out_v, faces
