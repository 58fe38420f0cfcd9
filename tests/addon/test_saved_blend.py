"""What a saved .blend holds: the texture last shown, for a generated object of several stages and
for a refined one, after saving and reopening the file (issue 17, point 10)."""

from __future__ import annotations

import bpy
import numpy as np
import pytest
from addon_helpers import ServerProcess, point_at, pump
from scripted_server import scripted_mesh

STEPS, LATER = 4, 3


@pytest.fixture(scope="module")
def staged_server(tmp_path_factory):
    """A scripted server whose jobs have a stage-1 final mesh followed by a texture stage."""
    srv = ServerProcess(tmp_path_factory.mktemp("staged-store"), later_meshes=LATER).start()
    yield srv
    srv.kill()


def _texture_of(addon, obj: bpy.types.Object) -> np.ndarray:
    """The RGB (row 0 on top) of the image on the object's material, as the backend sends textures."""
    node = addon.importer.material_image_node(obj.data.materials[0])
    return addon.importer.pixels_to_texture(node.image)[..., :3].astype(int)


def _save_and_reopen(path) -> None:
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.open_mainfile(filepath=str(path))


def _object_of(job_id: str) -> bpy.types.Object:
    return next(o for o in bpy.data.objects if o.get("dreamflow_job") == job_id)


def _start_job(server: ServerProcess, prompt: str):
    """Generate with the staged server; the panel's job record."""
    point_at(server.endpoint)
    s = bpy.context.scene.dreamflow
    s.prompt = prompt
    s.preset = "smoke"
    s.extra_overrides = f"stage1.steps={STEPS}"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    return s.jobs[-1]


def test_a_saved_blend_reopens_with_the_last_texture_of_a_generated_and_a_refined_object(addon, staged_server,
                                                                                         tmp_path):
    job = _start_job(staged_server, "several stages")
    pump(addon, lambda: job.state == "done")
    last = scripted_mesh(STEPS + LATER)["texture"].astype(int)
    assert not np.array_equal(last, scripted_mesh(STEPS)["texture"])   # stage 1's texture differs
    obj = _object_of(job.job_id)
    assert np.abs(_texture_of(addon, obj) - last).max() <= 1          # what is shown

    _save_and_reopen(tmp_path / "generated.blend")
    obj = _object_of(bpy.context.scene.dreamflow.jobs[0].job_id)
    assert np.abs(_texture_of(addon, obj) - last).max() <= 1          # what was saved

    # Refine that object: the scripted backend sends it back with its colours inverted.
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    s = bpy.context.scene.dreamflow
    s.refine_start_stage = "texture"
    assert bpy.ops.dreamflow.refine_selected() == {"FINISHED"}
    refine = s.jobs[1]
    pump(addon, lambda: refine.state == "done")
    inverted = 255 - last
    assert np.abs(_texture_of(addon, obj) - inverted).max() <= 1

    _save_and_reopen(tmp_path / "refined.blend")
    obj = _object_of(bpy.context.scene.dreamflow.jobs[1].job_id)
    assert np.abs(_texture_of(addon, obj) - inverted).max() <= 1      # not the first job's texture


def test_a_blend_saved_while_a_job_runs_holds_the_texture_shown_then(addon, staged_server, tmp_path):
    job = _start_job(staged_server, "save mid-job")
    pump(addon, lambda: any(o.get("dreamflow_job") == job.job_id and o.data["dreamflow_stage"] == "texture"
                            for o in bpy.data.objects))
    obj = _object_of(job.job_id)
    shown = _texture_of(addon, obj)
    assert obj.data["dreamflow_stage"] == "texture"             # past stage 1's final (packed) mesh
    assert np.abs(shown - scripted_mesh(STEPS)["texture"]).max() > 1
    addon.live.close_session()
    job_id = job.job_id
    _save_and_reopen(tmp_path / "mid-job.blend")
    assert np.abs(_texture_of(addon, _object_of(job_id)) - shown).max() <= 1
