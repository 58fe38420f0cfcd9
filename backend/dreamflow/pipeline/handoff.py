"""What one stage hands to the next, as types.

A stage takes the previous stage's result (or the job's input mesh) and returns its own:

- stage 1 returns a :class:`NerfResult`: its textured mesh and the NeRF field (stage 2a starts
  its DMTet from the field's density; the colour stages start their colour field from its colour
  network);
- stages 2a, 2b and 3 return a :class:`SurfaceResult`: the textured mesh, the fixed
  :class:`Surface` the colour stages tune on (with its UV layout, so later bakes keep it), and
  the colour field tuned so far;
- a job that starts from a given mesh begins with an :class:`InputMesh` (in box coordinates).

Every result carries its mesh (in the object box the cameras look at) and the stage's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..export.mesh import MeshData

if TYPE_CHECKING:  # the types only: scene/ is below pipeline/ and imports nothing from it
    from ..scene.nerf import NerfField
    from ..scene.texture_field import TextureField


@dataclass(kw_only=True)
class StageResult:
    """A stage's outcome: the textured mesh (box coordinates) and its metrics."""

    mesh: MeshData
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class InputMesh(StageResult):
    """The job's given mesh, checked and moved into the object box (pipeline/refine_input.py).

    Its UVs (when it has them) are kept by the colour stages; its texture, when it has one, is
    what their colour field starts from.
    """


@dataclass(kw_only=True)
class NerfResult(StageResult):
    """Stage 1: the NeRF field and the textured mesh extracted from it."""

    field: "NerfField"


@dataclass(frozen=True)
class Surface:
    """The fixed triangle mesh a colour stage tunes its field on (box coordinates)."""

    vertices: torch.Tensor            # (V, 3) float32
    faces: torch.Tensor               # (F, 3) long
    uvs: np.ndarray | None = None     # per-vertex UVs to keep (an input mesh's), else unwrapped once
    layout: MeshData | None = None    # this surface already unwrapped and baked: later bakes reuse its UVs


@dataclass(kw_only=True)
class SurfaceResult(StageResult):
    """Stages 2a, 2b and 3: the surface, its textured mesh (``mesh``, the surface's layout) and the colour field."""

    surface: Surface
    colour: "TextureField"


#: What a mesh stage (2a, 2b, 3) may start from.
MeshStageInput = NerfResult | SurfaceResult | InputMesh
