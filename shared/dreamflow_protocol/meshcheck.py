"""The one mesh validator: what makes a triangle mesh usable, checked the same way by the protocol
schema, the Blender add-on's import (blender_addon/meshprep.py), the backend's MeshData
(export/mesh.py) and a job's input mesh (pipeline/refine_input.py). numpy only.

Each caller says which exception it raises (``error``: message -> exception) and how strict it is:
Blender cannot build a triangle that repeats a vertex, so the add-on and the mesh stages refuse
them (``allow_degenerate=False``); DMTet needs a manifold input (``require_manifold``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def check_mesh(vertices: Any, faces: Any, normals: Any = None, uvs: Any = None, texture: Any = None, *,
               error: Callable[[str], Exception] = ValueError, allow_degenerate: bool = True,
               require_manifold: bool = False, max_vertices: int | None = None, max_faces: int | None = None) -> None:
    """Raise ``error(message)`` naming the first thing wrong with the mesh; return None when it is usable.

    Checks: (N, 3) vertices and (M, 3) integer faces, not empty (and within the limits), finite
    coordinates, face indices in [0, N), per-vertex normals (N, 3) and uvs (N, 2) that are finite,
    an (H, W, 3|4) uint8 texture; optionally no repeated vertex in a triangle and no edge shared
    by more than two triangles.
    """
    v, f = np.asarray(vertices), np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise error(f"vertices must be an (N, 3) array, got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise error(f"faces must be an (M, 3) array of triangles, got shape {f.shape}")
    if len(v) == 0 or len(f) == 0:
        raise error(f"mesh is empty ({len(v)} vertices, {len(f)} faces)")
    if max_vertices is not None and len(v) > max_vertices:
        raise error(f"mesh has {len(v)} vertices, more than {max_vertices}")
    if max_faces is not None and len(f) > max_faces:
        raise error(f"mesh has {len(f)} faces, more than {max_faces}")
    if not np.issubdtype(f.dtype, np.integer):
        raise error(f"faces must hold integers, got {f.dtype}")
    if not np.issubdtype(v.dtype, np.number):
        raise error(f"vertices must be numbers, got {v.dtype}")
    finite = np.isfinite(v).all(axis=1)
    if not finite.all():
        raise error(f"{int((~finite).sum())} vertices have NaN or infinite coordinates "
                    f"(first: vertex {int(np.argmin(finite))})")
    outside = ((f < 0) | (f >= len(v))).any(axis=1)
    if outside.any():
        first = int(np.argmax(outside))
        raise error(f"{int(outside.sum())} faces have vertex indices outside [0, {len(v) - 1}] "
                    f"(face indices found {int(f.min())}..{int(f.max())}; first: face {first} = {f[first].tolist()})")
    if not allow_degenerate:
        repeat = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 2] == f[:, 0])
        if repeat.any():
            raise error(f"{int(repeat.sum())} triangles repeat a vertex (degenerate; first: face {int(np.argmax(repeat))})")
    for name, arr, width in (("normals", normals, 3), ("uvs", uvs, 2)):
        if arr is None:
            continue
        a = np.asarray(arr)
        if a.shape != (len(v), width):
            raise error(f"{name} must be ({len(v)}, {width}) per vertex, got {a.shape}")
        if not np.isfinite(a).all():
            raise error(f"{name} contain NaN or infinite values")
    if texture is not None:
        t = np.asarray(texture)
        if t.ndim != 3 or t.shape[2] not in (3, 4) or t.dtype != np.uint8:
            raise error(f"texture must be an (H, W, 3|4) uint8 image, got {t.shape} {t.dtype}")
    if require_manifold:
        edges = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        _, counts = np.unique(edges, axis=0, return_counts=True)
        if (counts > 2).any():
            raise error(f"mesh is not manifold: {int((counts > 2).sum())} edges are shared by more than two faces")
