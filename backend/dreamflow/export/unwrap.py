"""UV unwrapping with xatlas: charts, packing and seams as split vertices (MeshData's convention)."""

from __future__ import annotations

import numpy as np

from .mesh import MeshData


def unwrap(mesh: MeshData, texture_size: int = 1024, padding: int = 2) -> MeshData:
    """The same surface with per-vertex UVs in [0, 1] (vertices split along seams; normals carried)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, faces, uvs = atlas[0]
    normals = None if mesh.normals is None else mesh.normals[vmapping]
    return MeshData(mesh.vertices[vmapping].astype(np.float32), faces.astype(np.int32), normals,
                    np.clip(uvs, 0.0, 1.0).astype(np.float32))
