"""Density field -> triangle mesh: marching cubes, largest components, simplification to a budget.

Marching cubes is PyMCubes; simplification is fast-simplification (Fast Quadric Mesh
Simplification, the quadric-error method), both from PyPI with wheels for every platform.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .mesh import MeshData, MeshError

BOX_HALF = 0.5


@torch.no_grad()
def sample_grid(fn: Callable[[torch.Tensor], torch.Tensor], resolution: int, device: torch.device | str = "cpu",
                chunk: int = 1 << 17, half: float = BOX_HALF) -> np.ndarray:
    """``fn`` evaluated on a resolution^3 lattice spanning [-half, half]^3 (axis order x, y, z)."""
    ax = torch.linspace(-half, half, resolution, device=device)
    pts = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    vals = torch.cat([fn(pts[i:i + chunk]).float().reshape(-1) for i in range(0, len(pts), chunk)])
    return vals.view(resolution, resolution, resolution).cpu().numpy()


def marching_cubes(volume: np.ndarray, level: float, half: float = BOX_HALF) -> MeshData:
    """Iso-surface ``volume == level`` (inside where volume > level), outward-facing, in world units."""
    import mcubes

    if not np.isfinite(volume).all():
        raise MeshError("the density field has NaN or infinite values; no surface can be extracted")
    if volume.max() <= level or volume.min() >= level:
        raise MeshError(f"the density field never crosses the level {level:g} (range {volume.min():.3g}..{volume.max():.3g}); "
                        "the optimisation produced no surface")
    # Pad with an "outside" layer so that surfaces touching the box are closed.
    padded = np.pad(volume, 1, mode="constant", constant_values=min(float(volume.min()), level - 1.0))
    verts, faces = mcubes.marching_cubes(padded, level)
    res = volume.shape[0]
    verts = (verts - 1.0) * (2.0 * half / (res - 1)) - half
    faces = faces.astype(np.int64)
    mesh = MeshData(verts.astype(np.float32), faces.astype(np.int32))
    return orient_outwards(mesh)


def usable_level(volume: np.ndarray, level: float) -> float:
    """``level``, or half the peak density when the field never reaches it (an early, faint field)."""
    peak = float(volume.max())
    if np.isfinite(peak) and 0.0 < peak <= level:
        return 0.5 * peak
    return level


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by the triangles (positive when their normals point outwards)."""
    v0, v1, v2 = (vertices[faces[:, k]].astype(np.float64) for k in range(3))
    return float(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6.0)


def orient_outwards(mesh: MeshData) -> MeshData:
    """Flip the winding if the mesh encloses negative volume."""
    if signed_volume(mesh.vertices, mesh.faces) < 0:
        return MeshData(mesh.vertices, mesh.faces[:, ::-1].copy(), mesh.normals, mesh.uvs, mesh.texture)
    return mesh


def keep_largest_components(mesh: MeshData, min_fraction: float = 0.1) -> MeshData:
    """Drop floaters: keep connected components with at least ``min_fraction`` of the largest's faces."""
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    labels = trimesh.graph.connected_component_labels(tm.face_adjacency, node_count=len(tm.faces))
    counts = np.bincount(labels)
    keep = np.isin(labels, np.nonzero(counts >= min_fraction * counts.max())[0])
    faces = mesh.faces[keep]
    used = np.unique(faces)
    remap = np.full(len(mesh.vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return MeshData(mesh.vertices[used], remap[faces].astype(np.int32))


def simplify(mesh: MeshData, face_budget: int) -> MeshData:
    """Quadric-error decimation down to at most ``face_budget`` faces (unchanged if already below)."""
    if len(mesh.faces) <= face_budget:
        return mesh
    import fast_simplification

    reduction = 1.0 - face_budget / len(mesh.faces)
    v, f = fast_simplification.simplify(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64),
                                        target_reduction=reduction)
    return MeshData(np.asarray(v, dtype=np.float32), np.asarray(f, dtype=np.int32))


def vertex_normals(mesh: MeshData) -> np.ndarray:
    """Area-weighted unit vertex normals (N, 3) float32 (geometry.vertex_normals in float64); +z
    where no face with an area touches a vertex, since a file's normals must be unit vectors."""
    from ..geometry import vertex_normals as normals_of

    n = normals_of(torch.from_numpy(mesh.vertices.astype(np.float64)), torch.from_numpy(np.asarray(mesh.faces))).numpy()
    n[np.linalg.norm(n, axis=1) == 0] = (0.0, 0.0, 1.0)
    return n.astype(np.float32)


def extract_surface(density_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int, level: float,
                    face_budget: int, device: torch.device | str = "cpu", min_component_fraction: float = 0.1) -> MeshData:
    """The density field's iso-surface, cleaned and simplified (no UVs yet)."""
    volume = sample_grid(density_fn, resolution, device)
    level = usable_level(volume, level)
    mesh = marching_cubes(volume, level)
    mesh = keep_largest_components(mesh, min_component_fraction)
    mesh = orient_outwards(simplify(mesh, face_budget))
    return mesh


def extract_textured_mesh(density_fn: Callable[[torch.Tensor], torch.Tensor],
                          colour_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int, level: float,
                          face_budget: int, texture_size: int, device: torch.device | str = "cpu") -> MeshData:
    """Iso-surface -> cleaned, simplified, unwrapped (xatlas) mesh with a baked albedo texture and normals."""
    from .bake import bake_texture
    from .unwrap import unwrap

    mesh = extract_surface(density_fn, resolution, level, face_budget, device)
    mesh.normals = vertex_normals(mesh)
    mesh = unwrap(mesh, texture_size)
    mesh.texture = bake_texture(mesh, colour_fn, texture_size, device)
    return mesh.as_float32().validate()
