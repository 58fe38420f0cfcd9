"""Reference objects for the reference-object prior: a built-in toy house, or any mesh file.

The built-in house is made in code and is deliberately not symmetric, so that a wrong camera
convention shows at once: seen from the front (camera on -Y, the Blender numpad-1 view) the blue
door is on the left half of the front wall and a yellow window on the right; the chimney stands on
the right (+X) back (+Y) slope of the roof; a green window is on the left (-X) wall only. It is a
closed surface (walls + gable roof + floor; the chimney sits on the roof) with per-vertex UVs into
a flat-coloured texture atlas. Everything is normalised into the unit box like a loaded file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..export.mesh import MeshData, MeshError

log = logging.getLogger(__name__)

#: Largest extent of a normalised reference object (a margin inside the box [-0.5, 0.5]^3).
NORMALISED_EXTENT = 0.8

WALL = (232, 214, 170)
WALL_BACK = (222, 200, 150)
DOOR = (40, 70, 200)
WINDOW = (250, 215, 40)
SIDE_WINDOW = (40, 170, 60)
ROOF_FRONT = (190, 50, 40)
ROOF_BACK = (150, 35, 30)
CHIMNEY = (90, 90, 95)
FLOOR = (110, 80, 50)
GABLE = (215, 190, 140)

_ATLAS = 256
_CELL = 64


def _cell_uv(col: int, row: int, inset: float = 3.0) -> tuple[float, float, float, float]:
    """UV rectangle (u0, v0, u1, v1) of atlas cell (col, row); row 0 is the bottom of the image."""
    u0 = (col * _CELL + inset) / _ATLAS
    u1 = ((col + 1) * _CELL - inset) / _ATLAS
    v0 = (row * _CELL + inset) / _ATLAS
    v1 = ((row + 1) * _CELL - inset) / _ATLAS
    return u0, v0, u1, v1


def _paint(img: np.ndarray, col: int, row: int, colour, rect=(0.0, 0.0, 1.0, 1.0)) -> None:
    """Fill a sub-rectangle (fractions u0, v0, u1, v1 of the cell, v up) of an atlas cell."""
    fu0, fv0, fu1, fv1 = rect
    x0 = int(round(col * _CELL + fu0 * _CELL))
    x1 = int(round(col * _CELL + fu1 * _CELL))
    # Image row 0 is the top, v = 1.
    y0 = _ATLAS - int(round(row * _CELL + fv1 * _CELL))
    y1 = _ATLAS - int(round(row * _CELL + fv0 * _CELL))
    img[y0:y1, x0:x1] = colour


class _Builder:
    """Collects faces with their own vertices and UVs (seams are split vertices)."""

    def __init__(self) -> None:
        self.vertices: list[np.ndarray] = []
        self.uvs: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.count = 0

    def polygon(self, corners, uv_corners) -> None:
        """A planar convex polygon, corners counter-clockwise seen from outside; fan-triangulated."""
        corners = np.asarray(corners, dtype=np.float64)
        k = len(corners)
        self.vertices.append(corners)
        self.uvs.append(np.asarray(uv_corners, dtype=np.float64))
        base = self.count
        self.faces.append(np.array([[base, base + i, base + i + 1] for i in range(1, k - 1)]))
        self.count += k

    def quad(self, origin, u, v, cell: tuple[int, int]) -> None:
        """Parallelogram origin + [0, 1] u + [0, 1] v (u x v points outwards) mapped onto an atlas cell."""
        o, u, v = (np.asarray(a, dtype=np.float64) for a in (origin, u, v))
        u0, v0, u1, v1 = _cell_uv(*cell)
        self.polygon([o, o + u, o + u + v, o + v], [(u0, v0), (u1, v0), (u1, v1), (u0, v1)])

    def mesh(self) -> MeshData:
        """The collected mesh."""
        return MeshData(np.concatenate(self.vertices).astype(np.float32), np.concatenate(self.faces).astype(np.int32),
                        uvs=np.concatenate(self.uvs).astype(np.float32))


def builtin_house() -> MeshData:
    """The built-in asymmetric toy house, textured, normalised into the unit box."""
    x0, x1, y0, y1, z0, z1, zr = -0.30, 0.30, -0.20, 0.20, -0.30, 0.02, 0.26
    w, d, h = x1 - x0, y1 - y0, z1 - z0
    b = _Builder()
    # Walls (no top: the roof closes the box) and floor.
    b.quad((x0, y0, z0), (w, 0, 0), (0, 0, h), (0, 3))       # front (-Y): door + window
    b.quad((x1, y1, z0), (-w, 0, 0), (0, 0, h), (1, 3))      # back (+Y)
    b.quad((x1, y0, z0), (0, d, 0), (0, 0, h), (2, 3))       # right (+X)
    b.quad((x0, y1, z0), (0, -d, 0), (0, 0, h), (3, 3))      # left (-X): green window
    b.quad((x0, y1, z0), (w, 0, 0), (0, -d, 0), (0, 2))      # floor (-Z)
    # Gable roof: ridge along X at y = 0.
    b.quad((x0, y0, z1), (w, 0, 0), (0, -y0, zr - z1), (1, 2))   # front slope
    b.quad((x1, y1, z1), (-w, 0, 0), (0, -y1, zr - z1), (2, 2))  # back slope
    gu0, gv0, gu1, gv1 = _cell_uv(3, 2)
    gmid = 0.5 * (gu0 + gu1)
    b.polygon([(x1, y0, z1), (x1, y1, z1), (x1, 0.0, zr)], [(gu0, gv0), (gu1, gv0), (gmid, gv1)])  # right gable
    b.polygon([(x0, y1, z1), (x0, y0, z1), (x0, 0.0, zr)], [(gu0, gv0), (gu1, gv0), (gmid, gv1)])  # left gable
    # Chimney on the back (+Y) slope, right (+X) side; its walls start on the slope.
    cx0, cx1, cy0, cy1, ctop = 0.12, 0.22, 0.05, 0.13, 0.36

    def slope(y: float) -> float:
        return z1 + (zr - z1) * (1.0 - y / y1)

    za, zb = slope(cy0), slope(cy1)
    cu0, cv0, cu1, cv1 = _cell_uv(0, 1)
    quad_uv = [(cu0, cv0), (cu1, cv0), (cu1, cv1), (cu0, cv1)]
    b.polygon([(cx0, cy0, za), (cx1, cy0, za), (cx1, cy0, ctop), (cx0, cy0, ctop)], quad_uv)   # -Y face
    b.polygon([(cx1, cy1, zb), (cx0, cy1, zb), (cx0, cy1, ctop), (cx1, cy1, ctop)], quad_uv)   # +Y face
    b.polygon([(cx1, cy0, za), (cx1, cy1, zb), (cx1, cy1, ctop), (cx1, cy0, ctop)], quad_uv)   # +X face
    b.polygon([(cx0, cy1, zb), (cx0, cy0, za), (cx0, cy0, ctop), (cx0, cy1, ctop)], quad_uv)   # -X face
    b.polygon([(cx0, cy0, ctop), (cx1, cy0, ctop), (cx1, cy1, ctop), (cx0, cy1, ctop)], quad_uv)  # top

    tex = np.zeros((_ATLAS, _ATLAS, 3), dtype=np.uint8)
    tex[:] = WALL
    _paint(tex, 0, 3, WALL)
    _paint(tex, 0, 3, DOOR, (0.12, 0.0, 0.38, 0.62))          # door: left half of the front wall
    _paint(tex, 0, 3, WINDOW, (0.60, 0.40, 0.85, 0.75))       # window: right half
    _paint(tex, 1, 3, WALL_BACK)
    _paint(tex, 2, 3, WALL)
    _paint(tex, 3, 3, WALL)
    _paint(tex, 3, 3, SIDE_WINDOW, (0.30, 0.35, 0.70, 0.75))  # only the left wall has a window
    _paint(tex, 0, 2, FLOOR)
    _paint(tex, 1, 2, ROOF_FRONT)
    _paint(tex, 2, 2, ROOF_BACK)
    _paint(tex, 3, 2, GABLE)
    _paint(tex, 0, 1, CHIMNEY)
    mesh = b.mesh()
    mesh.texture = tex
    return normalise(mesh)


def normalise(mesh: MeshData, extent: float = NORMALISED_EXTENT) -> MeshData:
    """Centre the bounding box at the origin and scale its largest side to ``extent``."""
    v = mesh.vertices.astype(np.float64)
    lo, hi = v.min(0), v.max(0)
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 0:
        raise MeshError("the reference mesh has no extent (all vertices coincide)")
    v = (v - 0.5 * (lo + hi)) * (extent / size)
    return MeshData(v.astype(np.float32), mesh.faces.astype(np.int32), mesh.normals, mesh.uvs, mesh.texture)


class LoadedReference(NamedTuple):
    """A reference mesh file as the renderer takes it, and where its colour came from."""

    mesh: MeshData
    vertex_colours: np.ndarray | None      # (V, 3) in [0, 1] when the file has no texture
    colours_from: str                     # one of COLOUR_SOURCES


#: Where a loaded reference's colour came from ("none": the file has no colour; it is rendered grey).
COLOUR_SOURCES = ("texture", "vertex colours", "face colours", "material colour", "none")
#: The grey of a reference file without colour.
NO_COLOUR_GREY = 0.7


def _rgb01(rgba: Any) -> np.ndarray:
    """trimesh's uint8 RGB(A) colours (any leading shape) as float RGB in [0, 1]."""
    return np.asarray(rgba, dtype=np.float32)[..., :3] / 255.0


def _texture_image(material: Any) -> Any:
    """The base colour image of a trimesh material (PBR or simple), if any."""
    image = getattr(material, "baseColorTexture", None)
    return image if image is not None else getattr(material, "image", None)


def _material_colour(material: Any) -> np.ndarray | None:
    """A material's flat base colour when the file sets one: glTF's baseColorFactor, an MTL's Kd."""
    from trimesh.visual.material import PBRMaterial, SimpleMaterial

    if isinstance(material, PBRMaterial):
        factor = material.baseColorFactor
        return None if factor is None else _rgb01(factor)
    if isinstance(material, SimpleMaterial):
        return _rgb01(material.diffuse)  # trimesh makes a SimpleMaterial only from an MTL
    return None


def _read_colours(loaded: Any, verts: np.ndarray, faces: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, str]:
    """(vertices, faces, uvs, texture, vertex colours, source) from every kind of trimesh visual.

    Face colours become per-corner vertex colours (each triangle gets its own three vertices), so
    each face keeps its flat colour instead of blurring into its neighbours.
    """
    visual = loaded.visual
    kind = getattr(visual, "kind", None)
    material = getattr(visual, "material", None)
    if kind == "texture":
        image = _texture_image(material)
        if image is not None and getattr(visual, "uv", None) is not None and len(visual.uv) == len(verts):
            tex = np.asarray(image.convert("RGB"), dtype=np.uint8)
            factor = getattr(material, "baseColorFactor", None)
            if factor is not None and np.any(np.asarray(factor)[:3] < 255):  # glTF: colour = factor * texture
                tex = (tex.astype(np.float32) * _rgb01(factor) + 0.5).astype(np.uint8)
            return verts, faces, np.asarray(visual.uv, dtype=np.float32), tex, None, "texture"
        flat = _material_colour(material)
        if flat is not None:
            return verts, faces, None, None, np.tile(flat, (len(verts), 1)), "material colour"
    elif kind == "vertex":
        return verts, faces, None, None, _rgb01(visual.vertex_colors), "vertex colours"
    elif kind == "face":
        corner_colours = np.repeat(_rgb01(visual.face_colors), 3, axis=0)
        split_faces = np.arange(3 * len(faces), dtype=np.int32).reshape(-1, 3)
        return verts[faces.reshape(-1)], split_faces, None, None, corner_colours, "face colours"
    return verts, faces, None, None, np.full((len(verts), 3), NO_COLOUR_GREY, dtype=np.float32), "none"


def load_reference(path: str | Path) -> LoadedReference:
    """Load any mesh file trimesh reads, normalised, with its colour (texture, vertex, face or material).

    glTF/GLB files are Y-up and are turned to the project's Z-up; other formats are taken as Z-up.
    A file without any colour is rendered grey, and the log says so (``colours_from == "none"``).
    """
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise MeshError(f"reference file {str(p)!r} does not exist")
    try:
        loaded = trimesh.load(str(p), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise MeshError(f"reference file {str(p)!r} is not a mesh trimesh can read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise MeshError(f"reference file {str(p)!r} is not a mesh: it holds no triangles")
    verts = np.asarray(loaded.vertices, dtype=np.float64)
    if p.suffix.lower() in (".glb", ".gltf"):
        verts = np.stack([verts[:, 0], -verts[:, 2], verts[:, 1]], axis=1)
    faces = np.asarray(loaded.faces, dtype=np.int32)
    verts, faces, uvs, tex, colours, source = _read_colours(loaded, verts, faces)
    if source == "none":
        log.warning("reference file %s has no colour (no texture, vertex, face or material colour): it is "
                    "rendered grey", p)
    mesh = MeshData(verts.astype(np.float32), faces.astype(np.int32), uvs=uvs, texture=tex)
    mesh.validate()
    return LoadedReference(normalise(mesh), colours, source)
