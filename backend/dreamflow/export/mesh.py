"""The mesh every part exchanges: backend stages, protocol messages, GLB/OBJ files, the add-on.

Arrays are plain numpy in the project's world frame (Z up, see scene/cameras.py). UVs are per
vertex (seams are split vertices, as xatlas produces), origin at the image's bottom-left (glTF and
Blender differ here; the GLB writer flips V, nothing else does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dreamflow_protocol.meshcheck import check_mesh


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

    def validate(self, require_manifold: bool = False, allow_degenerate: bool = True) -> "MeshData":
        """Check shapes, dtypes, finiteness and index range (dreamflow_protocol.meshcheck); return
        self or raise MeshError."""
        check_mesh(self.vertices, self.faces, self.normals, self.uvs, self.texture, error=MeshError,
                   allow_degenerate=allow_degenerate, require_manifold=require_manifold)
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
