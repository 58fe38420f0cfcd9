"""The add-on against `dreamflow serve` running the real pipeline (preset smoke, reference prior)."""

from __future__ import annotations

import bpy
import pytest
from conftest import point_at, pump


@pytest.mark.slow
def test_a_real_smoke_job_arrives_live_and_a_second_one_cancels(addon, real_server):
    point_at(real_server)
    scene = bpy.context.scene
    s = scene.dreamflow
    s.prompt = "a wooden chair"
    s.preset = "smoke"
    # Four steps with a mesh every two: an in-progress mesh, then the final one, in about a minute of CPU.
    s.extra_overrides = "prior.kind=reference; stage1.steps=4; stage1.mesh_every=2; stage1.preview_every=2"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    job = s.jobs[0]
    totals, meshes = set(), set()

    def finished() -> bool:
        totals.add(job.total)
        for o in bpy.data.objects:
            if o.get("dreamflow_job") == job.job_id:
                meshes.add((o.name, o.data["dreamflow_stage"], o.data["dreamflow_step"]))
        return job.state in ("done", "failed")

    pump(addon, finished, timeout=300)
    assert job.state == "done", job.message
    assert max(totals) == 4
    assert len({name for name, _, _ in meshes}) == 1 and len(meshes) >= 2   # one Object, updated in place
    objects = [o for o in bpy.data.objects if o.get("dreamflow_job") == job.job_id]
    assert len(objects) == 1 and len(bpy.data.meshes) == 1
    obj = objects[0]
    assert len(obj.data.polygons) > 100 and obj.data.uv_layers.active is not None
    image = next(n for n in obj.data.materials[0].node_tree.nodes if n.type == "TEX_IMAGE").image
    assert image.size[0] > 0 and image.packed_file is not None
    assert bpy.data.images.get(job.preview_image) is not None

    # A second job is cancelled after its first progress report; the first object stays as it is.
    s.seed = 1
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    second = s.jobs[1]
    pump(addon, lambda: second.step >= 1 or second.state == "failed", timeout=120)
    assert bpy.ops.dreamflow.cancel(job_id=second.job_id) == {"FINISHED"}
    pump(addon, lambda: second.state in ("cancelled", "done", "failed"), timeout=120)
    assert second.state == "cancelled"
    assert second.step < second.total
    assert obj.get("dreamflow_job") == job.job_id
