"""The toy world: six shapes in six colours, 36 objects with one prompt each, and their meshes.

Every object stands upright on +Z, centred on the origin (its bounding box's centre), and fills
most of the box [-0.5, 0.5]^3 (its largest half-extent is :data:`HALF_EXTENT`). The torus lies flat:
its axis is Z, so its hole faces up. Meshes carry explicit per-vertex normals: flat faces (the
cube, the pyramid, caps and bases) have their own vertices, so plain diffuse shading shows their
edges; curved surfaces have smooth normals.

The world's prompts are exactly ``"a red cube"``, ``"an orange torus"``: the article follows the
colour word. What people type ("an orange pyramid", "red balls") is read into those by
``dreamflow_protocol.prompts`` with this world's :data:`VOCABULARY`, the one table of its words
(the server publishes it, so the Blender add-on reads prompts the same way).
The oriented shapes (ORIENTED_SHAPES: a mug, an arrow, a house) have a front, facing -Y; their
prompts (ORIENTED_PROMPTS) sit beside the 36 in ALL_PROMPTS, and parse_prompt knows both.
This module's API (SHAPES, COLOURS, PROMPTS, prompt_for, parse_prompt, caption, ToyMesh,
object_mesh, COLOUR_RGB) is stable: the evaluator and the ground-truth measures build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from dreamflow_protocol.prompts import ToyPrompt, UnknownToyPrompt, Vocabulary, read_toy_prompt

from ..config import ConfigError
from ..scene.cameras import view_suffix

SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "torus", "square pyramid")
#: Shapes whose front differs from their back and sides (against the Janus problem). Their front
#: faces -Y, the world's front (a camera at azimuth 0 sees it): the mug's handle is on its right
#: (+X), the arrow points right (+X), the house's door is on its front wall.
ORIENTED_SHAPES: tuple[str, ...] = ("mug", "arrow", "house")
ALL_SHAPES: tuple[str, ...] = SHAPES + ORIENTED_SHAPES
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple")

#: Words people type for the world's shapes and colours (plurals of every shape form are read too).
SYNONYMS: dict[str, str] = {
    "pyramid": "square pyramid", "square based pyramid": "square pyramid", "ball": "sphere", "orb": "sphere",
    "box": "cube", "block": "cube", "ring": "torus", "donut": "torus", "doughnut": "torus", "tori": "torus",
    "violet": "purple",
}
VOCABULARY = Vocabulary(ALL_SHAPES, COLOURS, SYNONYMS)

#: Diffuse albedo of each colour word (linear RGB in [0, 1]); saturated and far apart in hue.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.68, 0.16),
    "blue": (0.12, 0.26, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.52, 0.04),
    "purple": (0.56, 0.16, 0.76),
}

#: Largest half-extent of every object: 0.4 of the box's 0.5, "most of the box" with room for a
#: NeRF's soft edges.
HALF_EXTENT = 0.4


def prompt_for(shape: str, colour: str) -> str:
    """The world's prompt for one object: "a red cube", "an orange torus"."""
    if shape not in ALL_SHAPES or colour not in COLOURS:
        raise ConfigError(f"no toy object {colour!r} {shape!r}; shapes: {', '.join(ALL_SHAPES)}; colours: {', '.join(COLOURS)}")
    return VOCABULARY.prompt_for(shape, colour)


#: The 36 prompts, colour-major within each shape: PROMPTS[s * 6 + c] is shape s, colour c.
PROMPTS: tuple[str, ...] = tuple(prompt_for(s, c) for s in SHAPES for c in COLOURS)
#: The oriented objects' prompts, in the same layout; ALL_PROMPTS[k] is ALL_SHAPES[k // 6], colour k % 6.
ORIENTED_PROMPTS: tuple[str, ...] = tuple(prompt_for(s, c) for s in ORIENTED_SHAPES for c in COLOURS)
ALL_PROMPTS: tuple[str, ...] = PROMPTS + ORIENTED_PROMPTS


def object_index(shape: str, colour: str) -> int:
    """Position of an object in :data:`ALL_PROMPTS` (for the symmetric shapes, also in :data:`PROMPTS`)."""
    return ALL_SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def read_prompt(prompt: str) -> ToyPrompt:
    """The object and the world's own prompt for what a person typed; a ConfigError listing the known words otherwise.

    Case, spaces, the article (a/an/the or none), plurals and :data:`SYNONYMS` are forgiven, and so
    is a view suffix (", front view").
    """
    try:
        return read_toy_prompt(prompt, VOCABULARY)
    except UnknownToyPrompt as exc:
        raise ConfigError(str(exc)) from None


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(shape, colour) of a toy-world prompt (:func:`read_prompt`'s forms); a ConfigError listing the known words otherwise."""
    read = read_prompt(prompt)
    return read.shape, read.colour


def caption(prompt: str, azimuth_deg: float | None = None, elevation_deg: float | None = None) -> str:
    """The caption the prior is conditioned on: the prompt, plus the pipeline's view suffix for a
    camera (LatentDiffusionPrior.condition writes ``f"{prompt}, {suffix}"``)."""
    if azimuth_deg is None or elevation_deg is None:
        return prompt
    return f"{prompt}, {view_suffix(azimuth_deg, elevation_deg)}"


# -- meshes ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToyMesh:
    """Triangles with per-vertex normals (float32 tensors); crease vertices are duplicated."""

    vertices: torch.Tensor   # (V, 3)
    faces: torch.Tensor      # (F, 3) int64, counter-clockwise seen from outside
    normals: torch.Tensor    # (V, 3) unit


class _Builder:
    def __init__(self) -> None:
        self.v: list[torch.Tensor] = []
        self.n: list[torch.Tensor] = []
        self.f: list[torch.Tensor] = []
        self.count = 0

    def add(self, verts: torch.Tensor, normals: torch.Tensor, faces: torch.Tensor) -> None:
        self.v.append(verts.float())
        self.n.append(torch.nn.functional.normalize(normals.float(), dim=-1))
        self.f.append(faces.long() + self.count)
        self.count += verts.shape[0]

    def flat_triangles(self, tris: torch.Tensor) -> None:
        """Triangles (T, 3, 3), each with its own vertices and its face normal."""
        n = torch.linalg.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0], dim=-1)
        self.add(tris.reshape(-1, 3), n.repeat_interleave(3, dim=0), torch.arange(tris.shape[0] * 3).view(-1, 3))

    def grid(self, points: torch.Tensor, normals: torch.Tensor, wrap_u: bool) -> None:
        """A (U, V) grid of points as a smooth quad strip surface; u wraps around when ``wrap_u``."""
        nu, nv = points.shape[:2]
        idx = torch.arange(nu * nv).view(nu, nv)
        us = range(nu if wrap_u else nu - 1)
        faces = []
        for i in us:
            i2 = (i + 1) % nu
            for j in range(nv - 1):
                a, b, c, d = idx[i, j], idx[i2, j], idx[i2, j + 1], idx[i, j + 1]
                faces += [(a, c, b), (a, d, c)]  # u east, v down: counter-clockwise from outside
        self.add(points.reshape(-1, 3), normals.reshape(-1, 3), torch.tensor(faces))

    def merge(self, mesh: ToyMesh, offset: tuple[float, float, float]) -> None:
        """Another mesh's triangles, moved by ``offset``."""
        self.add(mesh.vertices + torch.tensor(offset), mesh.normals, mesh.faces)

    def extrude(self, outline: list[tuple[float, float]], pieces: list[list[tuple[float, float]]],
                u: tuple[float, float, float], v: tuple[float, float, float], w0: float, w1: float) -> None:
        """A flat-sided prism: a polygon (counter-clockwise in the (u, v) plane) swept along u x v
        from w0 to w1; its caps are the convex ``pieces`` the polygon splits into (fans)."""
        U, V = torch.tensor(u), torch.tensor(v)
        W = torch.linalg.cross(U, V, dim=0)

        def point(p: tuple[float, float], w: float) -> torch.Tensor:
            return p[0] * U + p[1] * V + w * W

        tris = []
        for piece in pieces:
            for i in range(1, len(piece) - 1):
                a, b, c = piece[0], piece[i], piece[i + 1]
                tris += [torch.stack([point(a, w1), point(b, w1), point(c, w1)]),
                         torch.stack([point(a, w0), point(c, w0), point(b, w0)])]
        for p, q in zip(outline, outline[1:] + outline[:1]):
            tris += [torch.stack([point(p, w0), point(q, w0), point(q, w1)]),
                     torch.stack([point(p, w0), point(q, w1), point(p, w1)])]
        self.flat_triangles(torch.stack(tris))

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> None:
        """An axis-aligned box with flat faces."""
        rect = [(lo[0], lo[2]), (hi[0], lo[2]), (hi[0], hi[2]), (lo[0], hi[2])]
        # u = X, v = Z sweeps along -Y: from w = -hi[1] to w = -lo[1].
        self.extrude(rect, [rect], (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), -hi[1], -lo[1])

    def build(self) -> ToyMesh:
        return ToyMesh(torch.cat(self.v), torch.cat(self.f), torch.cat(self.n))


def _quad_grid(corner: torch.Tensor, du: torch.Tensor, dv: torch.Tensor, k: int) -> torch.Tensor:
    """A flat quad split into k x k cells, as triangles (2 k^2, 3, 3)."""
    tris = []
    for i in range(k):
        for j in range(k):
            p = corner + du * (i / k) + dv * (j / k)
            a, b, c, d = p, p + du / k, p + du / k + dv / k, p + dv / k
            tris += [torch.stack([a, b, c]), torch.stack([a, c, d])]
    return torch.stack(tris)


def _disc(b: _Builder, z: float, radius: float, segments: int, up: bool) -> None:
    """A flat disc at height z facing +Z (up) or -Z, as a fan of triangles."""
    t = torch.linspace(0, 2 * math.pi, segments + 1)[:-1]
    ring = torch.stack([radius * torch.cos(t), radius * torch.sin(t), torch.full_like(t, z)], -1)
    centre = torch.tensor([0.0, 0.0, z])
    nxt = ring.roll(-1, 0)
    tris = torch.stack([centre.expand_as(ring), ring, nxt], 1) if up else torch.stack([centre.expand_as(ring), nxt, ring], 1)
    b.flat_triangles(tris)


def _cube(h: float) -> ToyMesh:
    b = _Builder()
    e = torch.eye(3)
    for axis in range(3):
        for sign in (1.0, -1.0):
            n = e[axis] * sign
            u, v = e[(axis + 1) % 3], e[(axis + 2) % 3]
            if sign < 0:
                u, v = v, u
            corner = n * h - (u + v) * h
            b.flat_triangles(_quad_grid(corner, 2 * h * u, 2 * h * v, 4))
    return b.build()


def _sphere(r: float, rings: int = 24, segments: int = 48) -> ToyMesh:
    b = _Builder()
    theta = torch.linspace(0, math.pi, rings + 1)              # from the north pole down
    phi = torch.linspace(0, 2 * math.pi, segments + 1)[:-1]
    P, T = torch.meshgrid(phi, theta, indexing="ij")              # (U=segments, V=rings+1)
    n = torch.stack([torch.sin(T) * torch.cos(P), torch.sin(T) * torch.sin(P), torch.cos(T)], -1)
    b.grid(n * r, n, wrap_u=True)
    return b.build()


def _cylinder(r: float, h: float, segments: int = 48, stacks: int = 6) -> ToyMesh:
    b = _Builder()
    phi = torch.linspace(0, 2 * math.pi, segments + 1)[:-1]
    z = torch.linspace(h, -h, stacks + 1)
    P, Z = torch.meshgrid(phi, z, indexing="ij")
    n = torch.stack([torch.cos(P), torch.sin(P), torch.zeros_like(P)], -1)
    b.grid(torch.stack([r * torch.cos(P), r * torch.sin(P), Z], -1), n, wrap_u=True)
    _disc(b, h, r, segments, up=True)
    _disc(b, -h, r, segments, up=False)
    return b.build()


def _cone(r: float, h: float, segments: int = 48, stacks: int = 8) -> ToyMesh:
    b = _Builder()
    phi = torch.linspace(0, 2 * math.pi, segments + 1)[:-1]
    s = torch.linspace(0.0, 1.0, stacks + 1)                       # 0 at the apex, 1 at the base rim
    P, S = torch.meshgrid(phi, s, indexing="ij")
    pts = torch.stack([r * S * torch.cos(P), r * S * torch.sin(P), h - 2 * h * S], -1)
    slope = r / (2 * h)                                            # the side's normal tilts up by atan(r / 2h)
    n = torch.stack([torch.cos(P), torch.sin(P), torch.full_like(P, slope)], -1)
    b.grid(pts, n, wrap_u=True)
    _disc(b, -h, r, segments, up=False)
    return b.build()


def _torus(major: float, minor: float, segments: int = 48, sides: int = 24) -> ToyMesh:
    b = _Builder()
    u = torch.linspace(0, 2 * math.pi, segments + 1)[:-1]        # around the Z axis
    v = torch.linspace(0, 2 * math.pi, sides + 1)                 # around the tube (closed by repeating)
    U, V = torch.meshgrid(u, v, indexing="ij")
    n = torch.stack([torch.cos(V) * torch.cos(U), torch.cos(V) * torch.sin(U), torch.sin(V)], -1)
    centre = torch.stack([major * torch.cos(U), major * torch.sin(U), torch.zeros_like(U)], -1)
    # v runs upwards on the outside of the tube; flipped, it runs down like the other grids' v.
    b.grid((centre + minor * n).flip(1), n.flip(1), wrap_u=True)
    return b.build()


def _square_pyramid(h: float) -> ToyMesh:
    b = _Builder()
    apex = torch.tensor([0.0, 0.0, h])
    corners = torch.tensor([[-h, -h, -h], [h, -h, -h], [h, h, -h], [-h, h, -h]])
    sides = torch.stack([torch.stack([corners[i], corners[(i + 1) % 4], apex]) for i in range(4)])
    b.flat_triangles(sides)
    b.flat_triangles(torch.stack([torch.stack([corners[0], corners[2], corners[1]]),
                                  torch.stack([corners[0], corners[3], corners[2]])]))
    return b.build()


def _fit(mesh: ToyMesh) -> ToyMesh:
    """The mesh moved so that its bounding box is centred on the origin and scaled to half-extent 0.4."""
    lo, hi = mesh.vertices.amin(0), mesh.vertices.amax(0)
    scale = HALF_EXTENT / float((hi - lo).max() / 2)
    return ToyMesh((mesh.vertices - (lo + hi) / 2) * scale, mesh.faces, mesh.normals)


def _mug() -> ToyMesh:
    b = _Builder()
    b.merge(_cylinder(0.25, 0.4), (-0.08, 0.0, 0.0))
    # A squared-off handle on +X, its inner end buried in the body's wall.
    handle = [(0.12, -0.22), (0.33, -0.22), (0.33, 0.22), (0.12, 0.22), (0.12, 0.12), (0.25, 0.12), (0.25, -0.12),
              (0.12, -0.12)]
    pieces = [[(0.12, -0.22), (0.33, -0.22), (0.33, -0.12), (0.12, -0.12)],
              [(0.25, -0.12), (0.33, -0.12), (0.33, 0.12), (0.25, 0.12)],
              [(0.12, 0.12), (0.33, 0.12), (0.33, 0.22), (0.12, 0.22)]]
    b.extrude(handle, pieces, (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), -0.05, 0.05)
    return _fit(b.build())


def _arrow() -> ToyMesh:
    b = _Builder()
    # An upright sign seen from the front (u = X right, v = Z up), pointing right, 0.16 thick.
    shaft = [(-0.4, -0.12), (0.05, -0.12), (0.05, 0.12), (-0.4, 0.12)]
    head = [(0.05, -0.3), (0.4, 0.0), (0.05, 0.3)]
    outline = [(-0.4, -0.12), (0.05, -0.12), (0.05, -0.3), (0.4, 0.0), (0.05, 0.3), (0.05, 0.12), (-0.4, 0.12)]
    b.extrude(outline, [shaft, head], (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), -0.08, 0.08)
    return _fit(b.build())


def _house() -> ToyMesh:
    b = _Builder()
    # Walls and a gable roof in one prism: the gable ends face the sides (+-X), the ridge runs along X.
    gable = [(-0.28, -0.4), (0.28, -0.4), (0.28, 0.1), (0.0, 0.4), (-0.28, 0.1)]
    b.extrude(gable, [gable], (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), -0.36, 0.36)
    b.box((-0.2, -0.35, -0.4), (-0.04, -0.28, -0.06))      # the door, left of centre on the front wall
    b.box((0.14, 0.04, 0.0), (0.26, 0.16, 0.38))           # a chimney on the back slope, right
    return _fit(b.build())


@lru_cache(maxsize=None)
def object_mesh(shape: str) -> ToyMesh:
    """The mesh of a shape, upright on +Z, bounding box centred on the origin, half-extent 0.4.

    The torus: major radius 0.28, tube radius 0.12, axis Z (hole up). The cylinder and the cone:
    radius 0.35 and 0.4, height 0.8. The oriented shapes (ORIENTED_SHAPES) face -Y. Treat the
    returned tensors as read-only (they are cached).
    """
    h = HALF_EXTENT
    builders = {
        "cube": lambda: _cube(h),
        "sphere": lambda: _sphere(h),
        "cylinder": lambda: _cylinder(0.35, h),
        "cone": lambda: _cone(h, h),
        "torus": lambda: _torus(0.28, 0.12),
        "square pyramid": lambda: _square_pyramid(h),
        "mug": _mug,
        "arrow": _arrow,
        "house": _house,
    }
    if shape not in builders:
        raise ConfigError(f"unknown toy shape {shape!r}; shapes: {', '.join(ALL_SHAPES)}")
    return builders[shape]()


#: The file that marks a diffusers folder as a toy-world model (written by toyworld.train).
MARKER_FILE = "toyworld.json"


def is_toyworld_model(model: str) -> bool:
    """True when ``model`` is a local folder holding a model trained on the toy world."""
    from pathlib import Path

    return (Path(model) / MARKER_FILE).is_file()


def prompt_for_model(model: str, prompt: str) -> str:
    """The prompt a job with ``model`` runs: a toy-world model's own form of it (a ConfigError listing
    the known words when it has none); any other model's prompt as it is.

    Called when a job's configuration is built, so that an unknown prompt fails before anything is
    loaded or computed (CLI, demo and server submit alike).
    """
    if prompt.strip() and is_toyworld_model(model):
        read = read_prompt(prompt)
        _check_trained_on(model, read.prompt)
        return read.prompt
    return prompt


def _trained_prompts(model: str) -> list[str] | None:
    """The prompts a toy-world model's marker says it learnt (None: an old marker that does not say)."""
    import json
    from pathlib import Path

    return json.loads((Path(model) / MARKER_FILE).read_text()).get("prompts")


def _check_trained_on(model: str, prompt: str) -> None:
    """A ConfigError when the model's marker lists the prompts it learnt and this one is not among them
    (a model trained before the oriented objects knows only the 36)."""
    known = _trained_prompts(model)
    if known is not None and prompt not in known:
        raise ConfigError(f"the toy model {model} was not trained on {prompt!r}: it knows {len(known)} prompts "
                          f"(retrain it with `dreamflow toyworld train`, or pick one of its prompts)")


def model_vocabulary(model: str) -> Vocabulary:
    """The world's words, less the shapes a toy-world model never learnt (what the server publishes for it)."""
    known = set(_trained_prompts(model) or ALL_PROMPTS)
    shapes = tuple(s for s in ALL_SHAPES if any(prompt_for(s, c) in known for c in COLOURS))
    return Vocabulary(shapes, COLOURS, {k: v for k, v in SYNONYMS.items() if v in shapes or v in COLOURS})
