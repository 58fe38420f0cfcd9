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

Deterministic: the same seed gives the same cameras and bit-identical images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..render.raster import render_mesh
from ..scene.cameras import CameraRanges, Cameras, CameraSampler, view_suffix
from .world import COLOUR_RGB, COLOURS, PROMPTS, SHAPES, ToyMesh, object_index, object_mesh

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


@dataclass
class ToyImages:
    """A rendered, captioned set: N images of the 36 objects, with what each one shows."""

    images: torch.Tensor        # (N, 3, H, W) uint8
    object_ids: torch.Tensor    # (N,) int64, index into world.PROMPTS
    cameras: Cameras            # N cameras
    captions: list[str]         # prompt + ", " + view suffix

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


def render_dataset(views_per_object: int, resolution: int, seed: int,
                   ranges: CameraRanges = TOY_CAMERAS) -> ToyImages:
    """``views_per_object`` random cameras from ``ranges`` for each of the 36 objects, captioned.

    Object-major order: object k's views are rows ``k * views_per_object ...``. The cameras are
    drawn by one sampler seeded with ``seed`` (CameraSampler), so two seeds give disjoint views.
    """
    sampler = CameraSampler(ranges, seed=seed)
    images, ids, cams, captions = [], [], [], []
    for shape in SHAPES:
        for colour in COLOURS:
            k = object_index(shape, colour)
            cameras = sampler.sample(views_per_object)
            rgb, _ = render_object(shape, colour, cameras, resolution)
            images.append((rgb * 255.0).round().to(torch.uint8))
            ids.append(torch.full((views_per_object,), k, dtype=torch.long))
            cams.append(cameras)
            captions += [f"{PROMPTS[k]}, {view_suffix(a, e)}"
                         for a, e in zip(cameras.azimuth_deg.tolist(), cameras.elevation_deg.tolist())]
    all_cams = Cameras(*(torch.cat([getattr(c, f) for c in cams]) for f in
                         ("azimuth_deg", "elevation_deg", "distance", "fovy_deg")))
    return ToyImages(torch.cat(images), torch.cat(ids), all_cams, captions)
