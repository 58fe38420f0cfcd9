"""The panel, job list and preferences draw code, run against a recording layout (background
Blender has no real UILayout): every property it shows and every operator it offers must exist."""

from __future__ import annotations

from types import SimpleNamespace

import bpy
from addon_helpers import ADDON_MODULE, RecordingLayout, draw_panel


def test_panel_draws_settings_controls_progress_and_errors(addon):
    s = bpy.context.scene.dreamflow
    s.show_stages = True
    s.stage1.customize = True
    log = draw_panel()
    shown = {name for kind, name in log if kind == "prop"}
    assert {"prompt", "negative_prompt", "seed", "method", "preset", "resolution", "t_start", "t_end",
            "views_per_t", "steps", "refine_start_stage", "refine_start_t"} <= shown
    assert {("operator", "dreamflow.generate"), ("operator", "dreamflow.cancel"),
            ("operator", "dreamflow.refine_selected"), ("list", "jobs")} <= set(log)

    job = s.jobs.add()
    job.job_id, job.state, job.stage, job.step, job.total, job.eta = "c" * 32, "running", "stage1", 30, 120, 83.0
    s.active_job = 0
    state = bpy.context.window_manager.dreamflow
    state.connection, state.connection_message = "UNREACHABLE", "no DreamFlow server answered at tcp://127.0.0.1:5555"
    state.last_error = "Job cccccccc failed: CUDA out of memory"
    log = draw_panel()
    assert ("progress", "stage1 30/120  ETA 1m 23s") in log
    assert any(kind == "label" and "no DreamFlow server answered" in text for kind, text in log)
    assert any(kind == "label" and "CUDA out of memory" in text for kind, text in log)


def test_job_rows_and_preferences_draw(addon):
    s = bpy.context.scene.dreamflow
    job = s.jobs.add()
    job.job_id, job.state, job.kind, job.object_name = "d" * 32, "running", "refine", "Chair"
    log: list = []
    bpy.types.DREAMFLOW_UL_jobs.draw_item(None, bpy.context, RecordingLayout(log), s, job, 0, s, "active_job")
    assert ("operator", "dreamflow.reattach") in log and ("operator", "dreamflow.cancel") in log
    assert ("label", "Chair (refine)") in log

    prefs = bpy.context.preferences.addons[ADDON_MODULE].preferences
    prefs.address = "tcp://10.0.0.5:5555"
    log = []
    type(prefs).draw(SimpleNamespace(layout=RecordingLayout(log), **{k: getattr(prefs, k) for k in (
        "address", "server_key_file", "client_key_file", "timeout", "heartbeat", "poll_interval", "custom_normals",
        "start_local", "backend_executable", "backend_arguments")}, bl_rna=prefs.bl_rna), bpy.context)
    assert any(kind == "label" and "Online Access" in text for kind, text in log)
