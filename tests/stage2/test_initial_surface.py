"""Stage 2a's starting surface: from the NeRF's density, or from stage 1's exported (cleaned) mesh."""

from dataclasses import replace

import torch

from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.pipeline.handoff import NerfResult
from dreamflow.pipeline.stage2 import initial_dmtet
from dreamflow.toyworld.world import object_mesh


class SphereWithFloater:
    """A NeRF-like density: a sphere of radius 0.3 and a faint blob in a corner of the box."""

    def density(self, p: torch.Tensor) -> torch.Tensor:
        sphere = 10.0 * (p.norm(dim=-1) < 0.3)
        floater = 6.0 * ((p - torch.tensor([0.45, 0.45, 0.45])).norm(dim=-1) < 0.08)
        return (sphere + floater).float()


def _start(tmp_path, init_from: str) -> torch.Tensor:
    cfg = build_config("smoke")
    cfg = replace(cfg, geometry=replace(cfg.geometry, init_from=init_from, init_level=4.0))
    ctx = JobContext(cfg, tmp_path, RecordingSink(), JobControl(), torch.device("cpu"))
    sphere = object_mesh("sphere")
    scale = 0.3 / float(torch.as_tensor(sphere.vertices).norm(dim=-1).max())
    cleaned = MeshData(vertices=(torch.as_tensor(sphere.vertices) * scale).numpy(),
                       faces=torch.as_tensor(sphere.faces).numpy())
    incoming = NerfResult(mesh=cleaned, field=SphereWithFloater(), metrics={})
    vertices, _ = initial_dmtet(ctx, incoming, 32).mesh()
    return vertices.norm(dim=-1)


def test_from_the_density_the_floater_becomes_surface(tmp_path):
    radius = _start(tmp_path, "density")
    assert radius.max() > 0.6  # the corner blob is part of the starting surface


def test_from_the_exported_mesh_only_the_object_is_surface(tmp_path):
    radius = _start(tmp_path, "mesh")
    assert radius.max() < 0.4 and radius.min() > 0.2
