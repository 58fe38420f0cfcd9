"""An open, flat input mesh (a UV-mapped grid) refines: edge-on views see nothing and are stepped past."""

import math

import numpy as np

from dreamflow.events import JobControl, RecordingSink
from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job


def test_texture_refinement_of_a_flat_grid_keeps_its_topology(tmp_path):
    n = 9
    xs, ys = np.meshgrid(np.linspace(-0.4, 0.4, n), np.linspace(-0.4, 0.4, n))
    vertices = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], 1).astype(np.float32)
    faces = np.array([[a, a + 1, a + n + 1] for i in range(n - 1) for j in range(n - 1) for a in [i * n + j]]
                     + [[a, a + n + 1, a + n] for i in range(n - 1) for j in range(n - 1) for a in [i * n + j]], np.int32)
    uvs = np.stack([(xs.ravel() + 0.4) / 0.8, (ys.ravel() + 0.4) / 0.8], 1).astype(np.float32)
    mesh = MeshData(vertices, faces, None, uvs, np.full((32, 32, 3), 128, np.uint8))
    cfg = build_config("smoke", {"prior.kind": "reference"}, prompt="")
    sink = RecordingSink()
    run_job(cfg, tmp_path, sink, JobControl(), input_mesh=mesh, start_stage="texture", start_t=0.3)
    progress = [f for _, f, _ in sink.of_kind("progress")]
    # Every step of both stages ran and reported finite numbers: the edge-on views, which see no
    # pixel of the grid, were stepped past instead of stopping or poisoning the run.
    for stage in ("texture", "refine"):
        steps = [f for f in progress if f["stage"] == stage]
        assert [f["step"] for f in steps] == list(range(1, getattr(cfg, stage).steps + 1)), stage
        assert all(math.isfinite(f["loss"]) and math.isfinite(f["grad_norm"]) for f in steps), stage
    assert {f["stage"] for f in progress} == {"texture", "refine"}
    assert [f["stage"] for _, f, _ in sink.of_kind("stage_done")] == ["texture", "refine"]
    final = [a for kind, f, a in sink.of_kind("mesh") if f.get("final")][-1]
    assert len(final["faces"]) == len(faces)
    assert np.allclose(np.sort(final["vertices"], axis=0), np.sort(vertices, axis=0), atol=1e-5)
