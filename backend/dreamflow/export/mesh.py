"""The mesh every part exchanges: backend stages, protocol messages, GLB/OBJ files, the add-on.

Arrays are plain numpy in the project's world frame (Z up, see scene/cameras.py). UVs are per
vertex (seams are split vertices, as xatlas produces), origin at the image's bottom-left (glTF and
Blender differ here; the GLB writer flips V, nothing else does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MeshError(ValueError):
    """A mesh that cannot be used, with the reason in words."""


@dataclass
class MeshData:
    """A triangle mesh with optional per-vertex normals, UVs and an RGB(A) texture image."""

    vertices: np.ndarray               # (N, 3) float32
    faces: np.ndarray                  # (M, 3) int32, indices into vertices
    normals: np.ndarray | None = None  # (N, 3) float32, unit length
    uvs: np.ndarray | None = None      # (N, 2) float32 in [0, 1]
    texture: np.ndarray | None = None  # (H, W, 3 or 4) uint8, row 0 is the top of the image

    def validate(self, require_manifold: bool = False) -> "MeshData":
        """Check shapes, dtypes, finiteness and index range; return self or raise MeshError."""
        v, f = self.vertices, self.faces
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.shape[1] != 3:
            raise MeshError(f"vertices must be an (N, 3) array, got shape {getattr(v, 'shape', None)}")
        if not isinstance(f, np.ndarray) or f.ndim != 2 or f.shape[1] != 3:
            raise MeshError(f"faces must be an (M, 3) array of triangles, got shape {getattr(f, 'shape', None)}")
        if len(v) == 0 or len(f) == 0:
            raise MeshError(f"mesh is empty ({len(v)} vertices, {len(f)} faces)")
        if not np.issubdtype(f.dtype, np.integer):
            raise MeshError(f"faces must hold integers, got {f.dtype}")
        if not np.isfinite(v).all():
            bad = int((~np.isfinite(v)).any(axis=1).sum())
            raise MeshError(f"{bad} vertices have NaN or infinite coordinates")
        lo, hi = int(f.min()), int(f.max())
        if lo < 0 or hi >= len(v):
            raise MeshError(f"face indices must lie in [0, {len(v) - 1}], found {lo}..{hi}")
        for name, arr, width in (("normals", self.normals, 3), ("uvs", self.uvs, 2)):
            if arr is None:
                continue
            if arr.ndim != 2 or arr.shape != (len(v), width):
                raise MeshError(f"{name} must be ({len(v)}, {width}), got {arr.shape}")
            if not np.isfinite(arr).all():
                raise MeshError(f"{name} contain NaN or infinite values")
        if self.texture is not None:
            t = self.texture
            if t.ndim != 3 or t.shape[2] not in (3, 4) or t.dtype != np.uint8:
                raise MeshError(f"texture must be an (H, W, 3|4) uint8 image, got {t.shape} {t.dtype}")
        if require_manifold:
            edges = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
            _, counts = np.unique(edges, axis=0, return_counts=True)
            if (counts > 2).any():
                raise MeshError(f"mesh is not manifold: {int((counts > 2).sum())} edges are shared by more than two faces")
        return self

    def as_float32(self) -> "MeshData":
        """The same mesh with canonical dtypes (float32 arrays, int32 faces), copying only if needed."""
        def f32(a):
            return None if a is None else np.ascontiguousarray(a, dtype=np.float32)
        return MeshData(f32(self.vertices), np.ascontiguousarray(self.faces, dtype=np.int32), f32(self.normals),
                        f32(self.uvs), None if self.texture is None else np.ascontiguousarray(self.texture, dtype=np.uint8))

    def arrays(self) -> dict[str, np.ndarray]:
        """The non-empty arrays by name (the names the protocol's mesh message uses)."""
        out = {"vertices": self.vertices, "faces": self.faces}
        for name in ("normals", "uvs", "texture"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "MeshData":
        """Inverse of arrays()."""
        missing = {"vertices", "faces"} - set(arrays)
        if missing:
            raise MeshError(f"mesh is missing {', '.join(sorted(missing))}")
        return cls(arrays["vertices"], arrays["faces"], arrays.get("normals"), arrays.get("uvs"), arrays.get("texture"))
