"""Captioned images of the toy world, rendered with the project's own rasteriser.

Cameras are drawn from stage 1's camera ranges (pass the preset's ``stage1.cameras``), so the
prior learns exactly the views the NeRF is rendered from. Each image is captioned with its prompt
and the view suffix the pipeline adds for that camera (world.caption).

Shading is plain diffuse (Lambert) under one light fixed in the *world*, plus ambient. A
world-fixed Lambertian shading does not change with the viewpoint, so it is a colour painted on the
surface: the NeRF of stage 1 (albedo only, no shading) and the colour fields of stages 2b-3 can
reproduce these images exactly. A light that moved with the camera could not be matched by any
of them.

Background: white (1.0). Stages 2b and 3 composite their rasterised renders over a constant 1.0
(pipeline/stage2.COLOUR_BACKGROUND), and the reference-object prior does the same; stage 1's
learned background MLP (scene/nerf.py) has no colour of its own (random at the start) and
converges to whatever the prior shows behind the object, which must therefore be the colour the
later stages use. So the data has the one background that every stage can match: constant white.

Normal maps (``normal_maps=True``) are rendered exactly as stage 2a shows the prior its surface
(render_mesh mode "normal": world-space (n + 1) / 2 over NORMAL_BACKGROUND) and captioned
``"a red cube, normal map, front view"``: the geometry stage appends its normal-map caption
(GeometryStageConfig.normal_map_caption) to the prompt, and the prior then adds the view suffix.
The colour word stays, because the pipeline's prompt has it; a normal map has no colour, so each
shape's views are shared out over the six colour words in turn.

The oriented objects (world.ORIENTED_SHAPES) are rendered as real image data is: mostly from the
front (ORIENTED_FRONT_SHARE of the cameras within +-45 deg of it) and mostly without the view in
the caption (ORIENTED_VIEW_CAPTIONED), the bias behind the Janus problem.

Deterministic: the same seed gives the same cameras and bit-identical images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..render.raster import NORMAL_BACKGROUND, render_mesh
from ..scene.cameras import CameraRanges, Cameras, CameraSampler, view_suffix
from .world import ALL_PROMPTS, COLOUR_RGB, COLOURS, ORIENTED_SHAPES, SHAPES, ToyMesh, object_index, object_mesh

#: The toy preset's camera ranges for every stage (pipeline/config.py uses this constant): the paper's
#: elevations and azimuths, further away than the paper's 1.0-1.5 so that an object of half-extent 0.4
#: stays inside the frame at every field of view (at distance 1.0 and fovy 40 the frame's half-height is
#: 0.36, which would crop it).
TOY_CAMERAS = CameraRanges(distance=(1.3, 1.7), fovy_deg=(40.0, 60.0))
#: The background every image is composited over (see the module docstring).
BACKGROUND = 1.0
#: Direction *towards* the light, in world coordinates: above, in front (-Y) and to the right (+X).
LIGHT_DIRECTION = (0.45, -0.55, 0.70)
#: Shade = AMBIENT + (1 - AMBIENT) max(0, n . l): bright enough that dark faces keep their hue.
AMBIENT = 0.6
#: Share of an oriented object's cameras within +-45 deg of its front (azimuth 0); the rest are
#: spread evenly over the other 270 deg. Real photographs show objects mostly from the front.
ORIENTED_FRONT_SHARE = 0.6
#: Share of an oriented object's captions that name the view; the others are the bare prompt, as
#: most real captions never say from where a photograph was taken.
ORIENTED_VIEW_CAPTIONED = 0.4
#: What a normal-map render's caption adds to the prompt (before the view suffix).
NORMAL_MAP_CAPTION = "normal map"


def shaded_colours(mesh: ToyMesh, colour: str) -> torch.Tensor:
    """Per-vertex colours (V, 3): the albedo of ``colour`` under the world's diffuse light."""
    light = torch.nn.functional.normalize(torch.tensor(LIGHT_DIRECTION), dim=0)
    lambert = (mesh.normals @ light).clamp(min=0.0)
    shade = AMBIENT + (1.0 - AMBIENT) * lambert
    return shade[:, None] * torch.tensor(COLOUR_RGB[colour])[None]


def render_object(shape: str, colour: str, cameras: Cameras, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] over the white background, and coverage (B, 1, H, W)."""
    mesh = object_mesh(shape)
    out = render_mesh(mesh.vertices, mesh.faces, cameras, resolution, vertex_colors=shaded_colours(mesh, colour),
                      background=BACKGROUND, normals=mesh.normals, backend="torch")
    return out.image.clamp(0.0, 1.0), out.alpha.clamp(0.0, 1.0)


def render_normal_map(shape: str, cameras: Cameras, resolution: int) -> torch.Tensor:
    """Normal maps (B, 3, H, W) in [0, 1] as stage 2a renders a surface: world-space (n + 1) / 2."""
    mesh = object_mesh(shape)
    out = render_mesh(mesh.vertices, mesh.faces, cameras, resolution, mode="normal", background=NORMAL_BACKGROUND,
                      normals=mesh.normals, backend="torch")
    return out.image.clamp(0.0, 1.0)


def front_biased(cameras: Cameras, generator: torch.Generator) -> Cameras:
    """The cameras with new azimuths: ORIENTED_FRONT_SHARE of them within +-45 deg of the front."""
    n = len(cameras)
    front = torch.rand(n, generator=generator) < ORIENTED_FRONT_SHARE
    near = torch.rand(n, generator=generator) * 90.0 - 45.0
    away = (torch.rand(n, generator=generator) * 270.0 + 45.0 + 180.0) % 360.0 - 180.0
    return Cameras(torch.where(front, near, away), cameras.elevation_deg, cameras.distance, cameras.fovy_deg)


@dataclass
class ToyImages:
    """A rendered, captioned set: N images of the world's objects, with what each one shows."""

    images: torch.Tensor        # (N, 3, H, W) uint8
    object_ids: torch.Tensor    # (N,) int64, index into world.ALL_PROMPTS (== PROMPTS for the 36)
    cameras: Cameras            # N cameras
    captions: list[str]         # prompt [+ ", normal map"] + ", " + view suffix (the oriented: not always)
    plain_captions: list[str]   # the same without the view suffix

    @staticmethod
    def concat(parts: list["ToyImages"]) -> "ToyImages":
        """One set of several, in order."""
        cams = Cameras(*(torch.cat([getattr(p.cameras, f) for p in parts]) for f in
                         ("azimuth_deg", "elevation_deg", "distance", "fovy_deg")))
        return ToyImages(torch.cat([p.images for p in parts]), torch.cat([p.object_ids for p in parts]), cams,
                         [c for p in parts for c in p.captions], [c for p in parts for c in p.plain_captions])

    @property
    def shape_ids(self) -> torch.Tensor:
        """(N,) index into world.SHAPES."""
        return self.object_ids // len(COLOURS)

    @property
    def colour_ids(self) -> torch.Tensor:
        """(N,) index into world.COLOURS."""
        return self.object_ids % len(COLOURS)

    def __len__(self) -> int:
        return int(self.object_ids.shape[0])

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float() / 255.0


def render_dataset(views_per_object: int, resolution: int, seed: int, ranges: CameraRanges = TOY_CAMERAS,
                   shapes: tuple[str, ...] = SHAPES, normal_maps: bool = False, real_bias: bool = True) -> ToyImages:
    """``views_per_object`` random cameras from ``ranges`` for each object of ``shapes`` (in its six
    colours), captioned; with ``normal_maps``, normal maps instead of colour images.

    Object-major order: object k's views are rows ``k * views_per_object ...``; a normal-map set holds
    each shape's ``6 * views_per_object`` views in a row, their colour words taken in turn. The cameras
    are drawn by one sampler seeded with ``seed`` (CameraSampler), so two seeds give disjoint views;
    an oriented shape's azimuths and captions follow ORIENTED_FRONT_SHARE and ORIENTED_VIEW_CAPTIONED
    (``real_bias=False``: even azimuths, every caption with its view, as the evaluator's renders).
    """
    sampler = CameraSampler(ranges, seed=seed)
    bias = torch.Generator().manual_seed(seed + 1)
    images, ids, cams, captions, plain = [], [], [], [], []

    def add(shape: str, colours: list[str], cameras: Cameras, rgb: torch.Tensor) -> None:
        images.append((rgb * 255.0).round().to(torch.uint8))
        ids.append(torch.tensor([object_index(shape, c) for c in colours], dtype=torch.long))
        cams.append(cameras)
        named = (torch.rand(len(colours), generator=bias) < ORIENTED_VIEW_CAPTIONED) | (not real_bias)
        for colour, a, e, view in zip(colours, cameras.azimuth_deg.tolist(), cameras.elevation_deg.tolist(),
                                      named.tolist()):
            text = ALL_PROMPTS[object_index(shape, colour)] + (f", {NORMAL_MAP_CAPTION}" if normal_maps else "")
            plain.append(text)
            captions.append(f"{text}, {view_suffix(a, e)}" if view or shape not in ORIENTED_SHAPES else text)

    for shape in shapes:
        if normal_maps:
            cameras = sampler.sample(views_per_object * len(COLOURS))
            cameras = front_biased(cameras, bias) if real_bias and shape in ORIENTED_SHAPES else cameras
            add(shape, [COLOURS[j % len(COLOURS)] for j in range(len(cameras))], cameras,
                render_normal_map(shape, cameras, resolution))
            continue
        for colour in COLOURS:
            cameras = sampler.sample(views_per_object)
            cameras = front_biased(cameras, bias) if real_bias and shape in ORIENTED_SHAPES else cameras
            add(shape, [colour] * views_per_object, cameras, render_object(shape, colour, cameras, resolution)[0])
    all_cams = Cameras(*(torch.cat([getattr(c, f) for c in cams]) for f in
                         ("azimuth_deg", "elevation_deg", "distance", "fovy_deg")))
    return ToyImages(torch.cat(images), torch.cat(ids), all_cams, captions, plain)
