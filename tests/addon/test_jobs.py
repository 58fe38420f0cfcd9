"""Cancel, refine an artist's edit, and reattach after reopening the .blend, against a real server."""

from __future__ import annotations

import bpy
import numpy as np
from addon_helpers import point_at, pump
from dreamflow_protocol import Client


def _server_state(endpoint: str, job_id: str) -> str:
    with Client(endpoint, timeout=5) as c:
        return c.status(job_id)["state"]


def test_cancel_stops_the_running_job(addon, server):
    point_at(server.endpoint)
    s = bpy.context.scene.dreamflow
    s.prompt = "a long scripted job"
    s.preset = "smoke"
    s.extra_overrides = "stage1.steps=400"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    job = s.jobs[0]
    pump(addon, lambda: job.state == "running" and job.step >= 3)
    assert bpy.ops.dreamflow.cancel() == {"FINISHED"}
    pump(addon, lambda: job.state == "cancelled", timeout=10)
    assert job.step < 400
    assert _server_state(server.endpoint, job.job_id) == "cancelled"
    assert "cancel" in job.message
    # What it made so far stays in the scene.
    assert any(o.get("dreamflow_job") == job.job_id for o in bpy.data.objects)


def _artist_object() -> bpy.types.Object:
    """A UV-mapped, textured quad grid with a Subdivision modifier, edited by hand."""
    n = 4
    verts = [(x, y, 0.0) for y in range(n) for x in range(n)]
    faces = [(y * n + x, y * n + x + 1, (y + 1) * n + x + 1, (y + 1) * n + x)
             for y in range(n - 1) for x in range(n - 1)]
    mesh = bpy.data.meshes.new("artist")
    mesh.from_pydata(verts, [], faces)
    uv = mesh.uv_layers.new(name="UVMap")
    for loop in mesh.loops:
        co = mesh.vertices[loop.vertex_index].co
        uv.data[loop.index].uv = (co.x / (n - 1), co.y / (n - 1))
    # A seam: the corners of one face get their own UVs, so its vertices must be split.
    for li in mesh.polygons[4].loop_indices:
        uv.data[li].uv = (0.9, 0.1)
    obj = bpy.data.objects.new("Artist edit", mesh)
    bpy.context.scene.collection.objects.link(obj)
    obj.location = (5.0, 0.0, 0.0)
    mesh.vertices[5].co.z = 0.75                       # the artist's edit
    mod = obj.modifiers.new("subdiv", "SUBSURF")
    mod.levels = 1
    image = bpy.data.images.new("artist paint", 8, 8, alpha=True)
    px = np.zeros((8, 8, 4), np.float32)
    px[..., 1] = np.linspace(0, 1, 8)[:, None]         # green rises with the row
    px[..., 3] = 1.0
    image.pixels.foreach_set(px.ravel())
    mat = bpy.data.materials.new("artist material")
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True  # always on from Blender 5.0
    tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = image
    mesh.materials.append(mat)
    bpy.context.view_layer.objects.active = obj
    obj.select_set(True)
    return obj


def _corner_table(mesh: bpy.types.Mesh, corners: np.ndarray) -> set:
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    lv = np.empty(len(mesh.loops), np.int32)
    mesh.loops.foreach_get("vertex_index", lv)
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers.active.uv.foreach_get("vector", uv)
    rows = np.concatenate([co.reshape(-1, 3)[lv[corners]], uv.reshape(-1, 2)[corners]], axis=1)
    return set(map(tuple, np.round(rows, 4)))


def test_refine_selected_round_trips_the_edited_mesh(addon, server):
    point_at(server.endpoint)
    obj = _artist_object()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph).to_mesh()
    evaluated.calc_loop_triangles()
    tri = np.empty(len(evaluated.loop_triangles) * 3, np.int32)
    evaluated.loop_triangles.foreach_get("loops", tri)
    expected = _corner_table(evaluated, tri)
    n_tris = len(evaluated.loop_triangles)
    obj.evaluated_get(depsgraph).to_mesh_clear()
    original_pixels = np.empty(8 * 8 * 4, np.float32)
    obj.data.materials[0].node_tree.nodes["Image Texture"].image.pixels.foreach_get(original_pixels)

    s = bpy.context.scene.dreamflow
    s.prompt = "refine this"
    s.preset = "smoke"
    s.extra_overrides = "stage1.steps=2"
    s.refine_start_stage = "refine"
    s.refine_start_t = 0.3
    assert bpy.ops.dreamflow.refine_selected() == {"FINISHED"}
    job = s.jobs[0]
    assert job.kind == "refine"
    pump(addon, lambda: job.state == "done")

    # The same Object got the round-tripped mesh: triangles, positions and per-corner UVs as sent.
    assert obj.name == "Artist edit" and obj.get("dreamflow_job") == job.job_id
    assert len([o for o in bpy.data.objects]) == 1
    assert len(obj.data.polygons) == n_tris
    got = _corner_table(obj.data, np.arange(len(obj.data.loops)))
    assert got == expected
    assert tuple(obj.location) == (5.0, 0.0, 0.0)
    # Its modifier was baked into what was sent, so it is now off (not removed).
    assert [m.name for m in obj.modifiers] == ["subdiv"] and not obj.modifiers[0].show_viewport
    image = obj.data.materials[0].node_tree.nodes["Image Texture"].image
    back = np.empty(8 * 8 * 4, np.float32)
    image.pixels.foreach_get(back)
    assert np.abs(back - original_pixels).max() <= 1.0 / 255 + 1e-6


def test_reattach_after_reopening_the_file_resumes_from_the_last_seen_event(addon, server, tmp_path):
    point_at(server.endpoint)
    s = bpy.context.scene.dreamflow
    s.prompt = "survive a reopen"
    s.preset = "smoke"
    s.extra_overrides = "stage1.steps=30"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    job = s.jobs[0]
    pump(addon, lambda: job.last_seq >= 4 and any(o.get("dreamflow_job") for o in bpy.data.objects))
    addon.live.close_session()          # Blender closed while the job runs on
    path = str(tmp_path / "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)

    s = bpy.context.scene.dreamflow
    job = s.jobs[0]
    seen_before = job.last_seq
    assert seen_before >= 4 and job.state == "detached" and "Reattach" in job.message
    assert bpy.ops.dreamflow.reattach(job_id=job.job_id) == {"FINISHED"}
    pump(addon, lambda: job.state == "done", timeout=30)
    objects = [o for o in bpy.data.objects if o.get("dreamflow_job") == job.job_id]
    assert len(objects) == 1
    assert objects[0].data["dreamflow_step"] == 30
    assert job.last_seq > seen_before
    assert len(bpy.data.meshes) == 1
