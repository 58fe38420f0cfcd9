"""The add-on against `dreamflow serve` running the real pipeline (preset smoke, reference prior)."""

from __future__ import annotations

import bpy
import pytest
from addon_helpers import point_at, pump


def _stage1_only(s, steps: int) -> None:
    """Stage 1 only, through the panel's own stage switches (the rest of smoke costs minutes on 2 cores)."""
    s.preset = "smoke"
    for name in ("geometry", "texture", "refine"):
        getattr(s, name).enabled = False
    s.extra_overrides = f"prior.kind=reference; stage1.steps={steps}; stage1.mesh_every=2; stage1.preview_every=2"


@pytest.mark.slow
def test_a_real_job_cancels_and_another_arrives_live_in_place(addon, real_server):
    point_at(real_server)
    s = bpy.context.scene.dreamflow
    s.prompt = "a wooden chair"

    # A long job is cancelled once it reports progress: the pipeline stops at its next step.
    _stage1_only(s, 400)
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    long_job = s.jobs[0]
    pump(addon, lambda: long_job.step >= 1 or long_job.state == "failed", timeout=180)
    assert bpy.ops.dreamflow.cancel(job_id=long_job.job_id) == {"FINISHED"}
    pump(addon, lambda: long_job.state in ("cancelled", "done", "failed"), timeout=120)
    assert long_job.state == "cancelled" and long_job.step < 400

    # A short job: progress, an in-progress mesh, then the final one, all on one Object.
    _stage1_only(s, 4)
    s.seed = 1
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    job = s.jobs[1]
    totals, meshes = set(), set()

    def final_mesh_arrived() -> bool:
        totals.add(job.total)
        for o in bpy.data.objects:
            if o.get("dreamflow_job") == job.job_id:
                meshes.add((o.name, o.data["dreamflow_step"], o.data["dreamflow_final"]))
        return any(final for _, _, final in meshes) or job.state == "failed"

    pump(addon, final_mesh_arrived, timeout=300)
    assert job.state != "failed", job.message
    assert 4 in totals
    assert len({name for name, _, _ in meshes}) == 1 and len(meshes) >= 2   # one Object, updated in place
    obj = next(o for o in bpy.data.objects if o.get("dreamflow_job") == job.job_id)
    assert len(bpy.data.meshes) == len([o for o in bpy.data.objects if o.type == "MESH"])  # old meshes removed
    assert len(obj.data.polygons) > 100 and obj.data.uv_layers.active is not None
    image = next(n for n in obj.data.materials[0].node_tree.nodes if n.type == "TEX_IMAGE").image
    assert image.size[0] > 0 and image.packed_file is not None                     # packed with the final mesh
    assert bpy.data.images.get(job.preview_image) is not None

    # The artist edits that object and sends it back: texture-only refinement through the real
    # pipeline keeps the edit (same triangles, the moved vertex where the artist put it) and
    # updates the same Object in place.
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    obj.data.vertices[0].co.z += 0.05
    edited = obj.data.vertices[0].co.copy()
    n_polys = len(obj.data.polygons)
    s.texture.enabled = True
    s.extra_overrides = "prior.kind=reference; texture.steps=2; texture.mesh_every=1"
    s.refine_start_stage = "texture"
    s.refine_start_t = 0.3
    assert bpy.ops.dreamflow.refine_selected() == {"FINISHED"}
    refine = s.jobs[2]
    pump(addon, lambda: refine.state in ("done", "failed", "cancelled"), timeout=300)
    assert refine.state == "done", refine.message
    assert obj.get("dreamflow_job") == refine.job_id and obj.name in bpy.data.objects
    assert len(obj.data.polygons) == n_polys
    assert min((v.co - edited).length for v in obj.data.vertices) < 1e-4
