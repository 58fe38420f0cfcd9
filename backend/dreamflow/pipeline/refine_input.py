"""Refining a given mesh: the artist's edited mesh from Blender, or any mesh file in headless use.

A job may carry an input mesh and start at ``geometry`` (2a: DMTet remeshes it), ``texture`` (2b)
or ``refine`` (3), optionally with ``start_t`` (a lower starting time stays closer to the input).
Texture-only and stage-3 refinement never remesh: the result has the input's faces and vertex
positions (an input with UVs keeps its layout; one without is unwrapped, which only duplicates
vertices along UV seams). This module checks the input with clear errors and moves it into the
object box the cameras look at, and back out again for every mesh the job sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..export.mesh import MeshData, MeshError
from ..scene.texture_field import TextureField
from .handoff import InputMesh
from .metrics import sample_barycentric

START_STAGES = ("geometry", "texture", "refine")
#: Inputs already inside the object box [-0.5, 0.5]^3 are used as they are; larger ones are scaled
#: to this extent (the reference object's size), centred on their bounding box.
BOX_HALF = 0.5
FIT_EXTENT = 0.8


def validate_input_mesh(mesh: MeshData | None, start_stage: str | None) -> MeshData:
    """A canonical (float32/int32) copy of a usable input mesh, or MeshError saying what is wrong."""
    if mesh is None:
        raise MeshError(f"start stage {start_stage!r} needs an input mesh (vertices and faces)")
    if start_stage is not None and start_stage not in START_STAGES:
        raise MeshError(f"an input mesh can start at {', '.join(START_STAGES)}; got {start_stage!r}")
    try:
        # DMTet remeshes a manifold surface; the colour stages bake into the given faces, so no
        # triangle may repeat a vertex.
        m = mesh.validate(require_manifold=start_stage == "geometry", allow_degenerate=False).as_float32()
    except MeshError as exc:
        raise MeshError(f"input {exc}" if str(exc).startswith("mesh ") else f"input mesh: {exc}") from None
    if (m.uvs is None) != (m.texture is None) and m.texture is not None:
        raise MeshError("input mesh has a texture but no UVs to map it")
    return m


@dataclass(frozen=True)
class InputFrame:
    """The similarity that puts the input into the object box: ``box = (v - centre) * scale``."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    @classmethod
    def fit(cls, vertices: np.ndarray) -> "InputFrame":
        """Identity for meshes inside the box; otherwise centre and scale them to FIT_EXTENT."""
        if np.abs(vertices).max() <= BOX_HALF:
            return cls()
        lo, hi = vertices.min(0).astype(np.float64), vertices.max(0).astype(np.float64)
        extent = float((hi - lo).max())
        return cls(tuple(((lo + hi) * 0.5).tolist()), FIT_EXTENT / max(extent, 1e-12))

    @property
    def identity(self) -> bool:
        """True when no change of coordinates is needed."""
        return self.scale == 1.0 and self.centre == (0.0, 0.0, 0.0)

    def to_box(self, mesh: MeshData) -> MeshData:
        """The mesh in box coordinates (normals unchanged by a similarity)."""
        if self.identity:
            return mesh
        v = ((mesh.vertices.astype(np.float64) - np.array(self.centre)) * self.scale).astype(np.float32)
        return MeshData(v, mesh.faces, mesh.normals, mesh.uvs, mesh.texture)

    def from_box(self, mesh: MeshData) -> MeshData:
        """A result mesh back in the input's coordinates."""
        if self.identity:
            return mesh
        v = (mesh.vertices.astype(np.float64) / self.scale + np.array(self.centre)).astype(np.float32)
        return MeshData(v, mesh.faces, mesh.normals, mesh.uvs, mesh.texture)


def surface_colours(mesh: MeshData, count: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points drawn by area on a textured mesh and the texture's colours there (bilinear), in [0, 1]."""
    from ..render.raster import sample_texture

    tri, w = sample_barycentric(mesh, count, seed)
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces.astype(np.int64)
    pts = np.einsum("nk,nkd->nd", w, v[f[tri]])
    uv = np.einsum("nk,nkd->nd", w, mesh.uvs.astype(np.float64)[f[tri]])
    tex = torch.as_tensor(mesh.texture[..., :3]).float() / 255.0
    cols = sample_texture(tex, torch.as_tensor(uv, dtype=torch.float32)).numpy()
    return pts.astype(np.float32), cols.astype(np.float32)


def fit_field_to_texture(field: TextureField, mesh: MeshData, steps: int = 100, seed: int = 0) -> float:
    """Start a colour field from a textured input mesh (regression on surface samples); final MSE."""
    pts, cols = surface_colours(mesh, seed=seed)
    dev = next(field.parameters()).device
    return field.fit(torch.as_tensor(pts, device=dev), torch.as_tensor(cols, device=dev), steps=steps,
                     batch=4096, seed=seed)


def prepare_input(mesh: MeshData | None, start_stage: str) -> tuple[InputMesh, InputFrame | None]:
    """The job's input mesh checked and moved into the object box (what the first mesh stage takes),
    and the frame that moved it (None when it already was inside)."""
    checked = validate_input_mesh(mesh, start_stage)
    frame = InputFrame.fit(checked.vertices)
    return InputMesh(mesh=frame.to_box(checked)), None if frame.identity else frame
