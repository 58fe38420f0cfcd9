"""DreamFlow for Blender: text to textured 3D assets from a DreamFlow backend, imported live in place.

A Blender 4.2+ extension (see ``blender_manifest.toml``). Module map:
``properties`` (settings on the Scene, run state on the WindowManager, preferences),
``operators`` and ``ui`` (the sidebar panel), ``session`` (backend connection, no bpy, runs on
background threads), ``live`` (``drain_and_apply``: the one main-thread entry of received data),
``importer`` (arrays <-> Blender datablocks), ``jobspec`` (settings -> job spec, pure Python),
``backend`` (an optional local ``dreamflow serve`` process).
"""

from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from . import importer, live, operators, properties, ui

_CLASSES = (*properties.CLASSES, properties.DreamFlowPreferences, *operators.CLASSES, *ui.CLASSES)


@persistent
def _on_file_loaded(_filepath: str) -> None:
    """A reopened file's unfinished jobs are detached until the artist reattaches them."""
    live.close_session()
    live.detach_unfinished_jobs("reopened: press Reattach to follow this job again")


@persistent
def _before_save(_filepath: str) -> None:
    """A packed image is saved from its packed data: repack job images whose pixels changed since."""
    try:
        importer.pack_all_job_images()
    except Exception as exc:  # a failing handler must not stop the artist's save
        print(f"DreamFlow: could not pack the job textures before saving: {exc}")


def register() -> None:
    """Register classes, attach settings to Scene and WindowManager, start the update timer."""
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.dreamflow = bpy.props.PointerProperty(type=properties.DREAMFLOW_PG_settings)
    bpy.types.WindowManager.dreamflow = bpy.props.PointerProperty(type=properties.DREAMFLOW_PG_run)
    if not bpy.app.timers.is_registered(live.timer):
        bpy.app.timers.register(live.timer, first_interval=0.5, persistent=True)
    bpy.app.handlers.load_post.append(_on_file_loaded)
    bpy.app.handlers.save_pre.append(_before_save)


def unregister() -> None:
    """Stop the timer, the connection and any local backend; unregister everything."""
    if bpy.app.timers.is_registered(live.timer):
        bpy.app.timers.unregister(live.timer)
    if _on_file_loaded in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_file_loaded)
    if _before_save in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(_before_save)
    live.close_session()
    live.local_backend.stop()
    del bpy.types.WindowManager.dreamflow
    del bpy.types.Scene.dreamflow
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
