"""The extension installs and enables in real Blender; a job's meshes arrive live, in place."""

from __future__ import annotations

import os
import zipfile

import bpy
import numpy as np
from addon_helpers import ADDON_MODULE, REPO_DIR, point_at, pump


def test_built_zip_installs_with_blenders_installer_and_enables(installed):
    assert installed["result"] == {"FINISHED"}
    assert installed["enabled"]
    with zipfile.ZipFile(installed["zip"]) as z:
        names = z.namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names
    for wheel in ("pyzmq-", "msgpack-", "dreamflow_protocol-"):
        assert any(n.startswith("wheels/" + wheel) for n in names), wheel
    # Wheels for both Pythons and every platform ride along; Blender installs the matching ones.
    for tag in ("cp311", "cp313", "win_amd64", "macosx", "manylinux"):
        assert any(tag in n for n in names), tag
    assert os.path.isfile(os.path.join(REPO_DIR, "dreamflow", "blender_manifest.toml"))
    # The installer put this platform's wheels into the extensions' site-packages.
    assert {"zmq", "msgpack", "dreamflow_protocol"} <= set(installed["site_packages"])


def test_panel_operators_and_settings_are_registered(addon):
    assert hasattr(bpy.types, "DREAMFLOW_PT_main")
    assert bpy.types.DREAMFLOW_PT_main.bl_category == "DreamFlow"
    for op in ("generate", "cancel", "reattach", "refine_selected", "connect"):
        assert hasattr(bpy.ops.dreamflow, op)
    s = bpy.context.scene.dreamflow
    assert s.method == "apfo"
    assert bpy.context.preferences.addons[ADDON_MODULE].preferences.address.startswith("tcp://")


def test_generate_brings_the_object_in_and_updates_it_in_place(addon, server):
    point_at(server.endpoint)
    scene = bpy.context.scene
    s = scene.dreamflow
    s.prompt = "a scripted grid"
    s.preset = "smoke"
    s.extra_overrides = "stage1.steps=8"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    pump(addon, lambda: any(o.get("dreamflow_job") for o in bpy.data.objects))
    job = s.jobs[0]
    obj = next(o for o in bpy.data.objects if o.get("dreamflow_job") == job.job_id)
    first_mesh = (obj.data["dreamflow_stage"], obj.data["dreamflow_step"])
    # The artist moves the object, adds a modifier and selects it while the job runs.
    obj.location = (1.0, 2.0, 3.0)
    obj.modifiers.new("bevel", "BEVEL")
    obj.select_set(True)
    seen = {first_mesh}
    progress = []

    def done() -> bool:
        seen.add((obj.data["dreamflow_stage"], obj.data["dreamflow_step"]))
        progress.append((job.stage, job.step, job.total))
        return job.state == "done"

    pump(addon, done)
    assert len([o for o in bpy.data.objects if o.get("dreamflow_job")]) == 1      # one Object per job
    assert len(seen) >= 2 and ("export", 8) in seen and first_mesh != ("export", 8)  # new meshes arrived
    assert len(bpy.data.meshes) == 1                                            # old ones were removed
    assert tuple(obj.location) == (1.0, 2.0, 3.0)
    assert [m.type for m in obj.modifiers] == ["BEVEL"]
    assert obj.select_get()
    assert any(total == 8 and 0 < step <= 8 for _, step, total in progress)
    assert job.last_seq > 0
    # The final mesh is the scripted one for step 8: z = 0.8, with UVs per corner.
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    assert np.allclose(co.reshape(-1, 3)[:, 2], 0.8)
    assert len(obj.data.polygons) == 128 and obj.data.uv_layers.active is not None
    # The texture is on a Principled material; top rows of the sent image are red, and Blender
    # stores rows bottom-up, so Blender's last row is red and its first row blue.
    mat = obj.data.materials[0]
    node = next(n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE")
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert bsdf.inputs["Base Color"].links[0].from_node == node
    image = node.image
    assert tuple(image.size) == (64, 64)
    px = np.empty(64 * 64 * 4, np.float32)
    image.pixels.foreach_get(px)
    px = px.reshape(64, 64, 4)
    assert px[-1, 0, 0] == 1.0 and px[-1, 0, 2] == 0.0
    assert px[0, 0, 0] == 0.0 and px[0, 0, 2] == 1.0
    assert image.packed_file is not None                                       # packed when done
    assert len([i for i in bpy.data.images if i.name.startswith("DreamFlow") and "preview" not in i.name]) == 1
    preview = bpy.data.images[job.preview_image]
    assert tuple(preview.size) == (16, 16)


def test_mesh_apply_is_all_or_nothing(addon):
    """A mesh Blender cannot take leaves the object exactly as it was and no stray datablock."""
    importer = addon.importer
    scene = bpy.context.scene
    from scripted_server import scripted_mesh

    good = scripted_mesh(2)
    obj = importer.apply_mesh(scene, "a" * 32, good)
    before = (obj.data.name, len(bpy.data.meshes), len(bpy.data.images))
    bad = dict(good, faces=good["faces"].copy())
    bad["faces"][5] = (3, 3, 4)                     # a triangle that repeats a vertex
    for broken in (bad, dict(good, uvs=good["uvs"][:5]), dict(good, vertices=good["vertices"] * np.nan)):
        try:
            importer.apply_mesh(scene, "a" * 32, broken)
        except importer.ImportError_ as exc:
            assert str(exc)
        else:
            raise AssertionError("a broken mesh was accepted")
        assert (obj.data.name, len(bpy.data.meshes), len(bpy.data.images)) == before


def test_drain_respects_its_budget_and_skips_superseded_meshes(addon, server, monkeypatch):
    """Events wait in the queue until drained; a zero time budget applies one per call, and a
    batch applies only the newest of several in-progress meshes of one job."""
    import time

    point_at(server.endpoint)
    s = bpy.context.scene.dreamflow
    s.prompt = "queued up"
    s.preset = "smoke"
    s.extra_overrides = "stage1.steps=8"
    bpy.ops.dreamflow.generate()
    job = s.jobs[0]
    pump(addon, lambda: not job.job_id.startswith("pending-"), timeout=10)
    session = addon.live.get_session()
    deadline = time.monotonic() + 20
    while len(session.pending()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert addon.live.drain_and_apply(bpy.context.scene, max_messages=100, time_budget_s=0.0) == 1
    assert addon.live.drain_and_apply(bpy.context.scene, max_messages=100, time_budget_s=0.0) == 1
    while "job_done" not in session.pending():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    built = []
    real_apply = addon.importer.apply_mesh
    monkeypatch.setattr(addon.importer, "apply_mesh", lambda *a, **k: built.append(k["step"]) or real_apply(*a, **k))
    addon.live.drain_and_apply(bpy.context.scene, max_messages=1000, time_budget_s=60.0)
    assert job.state == "done"
    assert built == [8]                 # steps 2, 4, 6 and the in-progress 8 were superseded by the final mesh


def test_built_mesh_matches_blenders_own_construction(addon):
    """The attribute fast path gives the same mesh as Blender's from_pydata, and validates clean."""
    from scripted_server import scripted_mesh

    arrays = scripted_mesh(3)
    arrays["faces"] = arrays["faces"][np.random.default_rng(0).permutation(len(arrays["faces"]))]
    fast = addon.importer.build_mesh("fast", addon.meshprep.prepare_mesh(
        {"vertices": arrays["vertices"], "faces": arrays["faces"], "uvs": arrays["uvs"]}))
    ref = bpy.data.meshes.new("ref")
    ref.from_pydata(arrays["vertices"].tolist(), [], arrays["faces"].tolist())

    def edge_set(mesh):
        e = np.empty(len(mesh.edges) * 2, np.int32)
        mesh.edges.foreach_get("vertices", e)
        return set(map(tuple, np.sort(e.reshape(-1, 2), axis=1)))

    def corner_edges_as_pairs(mesh):
        ce = np.empty(len(mesh.loops), np.int32)
        mesh.loops.foreach_get("edge_index", ce)
        e = np.empty(len(mesh.edges) * 2, np.int32)
        mesh.edges.foreach_get("vertices", e)
        return np.sort(e.reshape(-1, 2)[ce], axis=1)

    assert edge_set(fast) == edge_set(ref)
    assert np.array_equal(corner_edges_as_pairs(fast), corner_edges_as_pairs(ref))
    assert fast.validate(verbose=False) is False          # nothing for Blender to fix
    uv = np.empty(len(fast.loops) * 2, np.float32)
    fast.uv_layers.active.uv.foreach_get("vector", uv)
    assert np.array_equal(uv.reshape(-1, 2), arrays["uvs"][arrays["faces"].ravel()])
    assert all(p.use_smooth for p in fast.polygons)


def test_received_normals_become_custom_normals_when_asked(addon):
    from scripted_server import scripted_mesh

    arrays = scripted_mesh(1)
    tilted = np.tile(np.array([0.6, 0.0, 0.8], np.float32), (len(arrays["vertices"]), 1))
    prepared = addon.meshprep.prepare_mesh({"vertices": arrays["vertices"], "faces": arrays["faces"],
                                            "normals": tilted})
    plain = addon.importer.build_mesh("plain", prepared)
    custom = addon.importer.build_mesh("custom", prepared, custom_normals=True)
    for mesh, expected in ((plain, (0.0, 0.0, 1.0)), (custom, (0.6, 0.0, 0.8))):
        n = np.empty(len(mesh.loops) * 3, np.float32)
        mesh.corner_normals.foreach_get("vector", n)
        assert np.allclose(n.reshape(-1, 3), expected, atol=1e-4)
