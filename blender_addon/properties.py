"""Blender-side data: per-file settings and job list on the Scene, transient run state on the
WindowManager, backend address and keys in the add-on preferences.

The Scene's settings are saved in the .blend, so a reopened file knows its jobs (id, object,
last sequence number seen) and can reattach to a running one. The WindowManager's run state is
never saved: connection status and the last error belong to this Blender session only.
"""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

from . import jobspec
from .backend import DEFAULT_ARGUMENTS

METHOD_ITEMS = [
    ("apfo", "APFO", "Approximate Probability Flow ODE (DreamFlow): a predetermined decreasing timestep schedule"),
    ("vsd", "VSD", "Variational score distillation (ProlificDreamer)"),
    ("sds", "SDS", "Score distillation sampling (DreamFusion)"),
    ("fsd", "FSD", "Flow score distillation: world-map noise, decreasing timesteps"),
]
PRESET_ITEMS = [
    ("paper", "Paper", "The paper's settings: a GPU server with Stable Diffusion weights, about an hour"),
    ("preview", "Preview", "Minutes on a laptop CPU with the small shipped toy-world prior: 36 prompts such as "
                           "'a red cube' or 'an orange torus'"),
    ("reference", "Reference", "Minutes on a laptop CPU: rebuilds the built-in reference object (no text prior)"),
    ("smoke", "Smoke", "Seconds: the smallest run that exercises every stage (tests)"),
]
START_STAGE_ITEMS = [
    ("geometry", "Geometry", "Re-tune the shape, then texture and refine"),
    ("texture", "Texture", "Keep the shape, paint a new texture, then refine"),
    ("refine", "Refine", "Stage 3 only: sharpen shape and texture at high resolution"),
]
STATE_ICONS = {"queued": "TIME", "submitting": "TIME", "running": "PLAY", "cancelling": "CANCEL", "done": "CHECKMARK",
               "failed": "ERROR", "cancelled": "X", "detached": "UNLINKED"}
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})

# Defaults per stage: the preview preset's values, a sensible start when the artist customises.
STAGE_DEFAULTS = {
    "stage1": dict(resolution=64, t_start=1.0, t_end=0.2, views_per_t=1, steps=300),
    "geometry": dict(resolution=128, t_start=0.8, t_end=0.4, views_per_t=1, steps=150),
    "texture": dict(resolution=128, t_start=0.5, t_end=0.1, views_per_t=1, steps=150),
    "refine": dict(resolution=256, t_start=0.3, t_end=0.0, views_per_t=2, steps=60),
}


def _stage_group(name: str) -> type:
    d = STAGE_DEFAULTS[name]
    label = jobspec.STAGE_LABELS[name]
    lim = jobspec.STAGE_LIMITS  # the backend's ranges of these settings
    annotations = {
        "enabled": BoolProperty(name="Enable", default=True, description=f"Run {label}"),
        "customize": BoolProperty(name="Customise", default=False,
                                  description="Send these values instead of the preset's"),
        "resolution": IntProperty(name="Resolution", default=d["resolution"], min=lim["resolution"][0], max=lim["resolution"][1],
                                  description="Render resolution in pixels"),
        "t_start": FloatProperty(name="t start", default=d["t_start"], min=lim["t_start"][0], max=lim["t_start"][1],
                                 description="First (largest) diffusion time of the schedule"),
        "t_end": FloatProperty(name="t end", default=d["t_end"], min=lim["t_end"][0], max=lim["t_end"][1],
                               description="Last (smallest) diffusion time of the schedule"),
        "views_per_t": IntProperty(name="Views per timestep", default=d["views_per_t"], min=lim["views_per_t"][0], max=lim["views_per_t"][1],
                                   description="Iterations (random views) spent at each timestep"),
        "steps": IntProperty(name="Steps", default=d["steps"], min=lim["steps"][0], max=lim["steps"][1],
                             description="Optimisation iterations of this stage"),
    }
    return type(f"DREAMFLOW_PG_{name}", (bpy.types.PropertyGroup,), {"__annotations__": annotations})


STAGE_GROUPS = {name: _stage_group(name) for name in jobspec.STAGES}


class DREAMFLOW_PG_job(bpy.types.PropertyGroup):
    """One job of this file: enough to find its object and reattach after reopening."""

    job_id: StringProperty(name="Job")
    kind: StringProperty(name="Kind", default="generate")
    prompt: StringProperty(name="Prompt")
    object_name: StringProperty(name="Object")
    object_id: StringProperty(name="Object id")
    last_seq: IntProperty(name="Last sequence number", default=-1, min=-1)
    state: StringProperty(name="State", default="queued")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step", default=0)
    total: IntProperty(name="Total", default=0)
    eta: FloatProperty(name="ETA", default=-1.0)
    loss: FloatProperty(name="Loss", default=0.0)
    message: StringProperty(name="Message")
    preview_image: StringProperty(name="Preview image")
    modifiers_off: BoolProperty(name="Modifiers turned off", default=False,
                                description="The refined object's modifiers were baked into the sent mesh "
                                            "and turned off")


_following_server = False  # True while the add-on itself sets a file's preset from the server's capabilities


def _preset_picked(settings: "DREAMFLOW_PG_settings", _context: bpy.types.Context) -> None:
    """The artist picked a preset: this file keeps it, whatever server it connects to."""
    if not _following_server:
        settings.preset_chosen = True


def follow_server_preset(settings: "DREAMFLOW_PG_settings", preset: str | None) -> None:
    """Set the best preset the server can run, unless the artist picked one in this file."""
    global _following_server
    if preset is None or settings.preset_chosen or settings.preset == preset:
        return
    _following_server = True
    try:
        settings.preset = preset
    finally:
        _following_server = False


class DREAMFLOW_PG_settings(bpy.types.PropertyGroup):
    """Everything one file remembers: the generation settings and its jobs."""

    prompt: StringProperty(name="Prompt", default="", description="What to make")
    negative_prompt: StringProperty(name="Negative prompt", default="", description="What to avoid")
    seed: IntProperty(name="Seed", default=0, min=0)
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default="apfo")
    preset: EnumProperty(name="Preset", items=PRESET_ITEMS, default="preview", update=_preset_picked,
                         description="Settings preset; until picked, the best the connected server can run")
    preset_chosen: BoolProperty(name="Preset chosen", default=False,
                                description="The artist picked this file's preset (it no longer follows the server)")
    extra_overrides: StringProperty(name="Extra overrides", default="",
                                    description="More settings as key=value; key=value (e.g. prior.kind=reference)")
    show_stages: BoolProperty(name="Stage settings", default=False)
    stage1: PointerProperty(type=STAGE_GROUPS["stage1"])
    geometry: PointerProperty(type=STAGE_GROUPS["geometry"])
    texture: PointerProperty(type=STAGE_GROUPS["texture"])
    refine: PointerProperty(type=STAGE_GROUPS["refine"])
    refine_start_stage: EnumProperty(name="Start stage", items=START_STAGE_ITEMS, default="texture")
    refine_start_t: FloatProperty(name="Start t", default=0.5, min=0.0, max=1.0,
                                  description="Diffusion time the refinement starts from: lower keeps more of the edit")
    jobs: CollectionProperty(type=DREAMFLOW_PG_job)
    active_job: IntProperty(name="Active job", default=-1)

    def stage_settings(self) -> dict[str, jobspec.StageSettings]:
        """The stage groups as plain values."""
        out = {}
        for name in jobspec.STAGES:
            g = getattr(self, name)
            out[name] = jobspec.StageSettings(g.enabled, g.customize, g.resolution, g.t_start, g.t_end,
                                              g.views_per_t, g.steps)
        return out

    def find_job(self, job_id: str) -> "DREAMFLOW_PG_job | None":
        """This file's record of ``job_id``."""
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        return None


class DREAMFLOW_PG_run(bpy.types.PropertyGroup):
    """Transient run state of this Blender session (never saved)."""

    connection: EnumProperty(name="Connection", items=[
        ("IDLE", "Not connected", ""), ("CONNECTING", "Connecting", ""), ("CONNECTED", "Connected", ""),
        ("LOST", "Connection lost", ""), ("UNREACHABLE", "Unreachable", "")], default="IDLE")
    connection_message: StringProperty(name="Connection message")
    server_info: StringProperty(name="Server")
    last_error: StringProperty(name="Last error")
    # What the last error is about ("connection" or "") and when it came (seconds on live.py's clock):
    # live.clear_passed_error takes it away once that has passed.
    last_error_about: StringProperty(name="Last error is about")
    last_error_at: FloatProperty(name="Last error at")


CLASSES = (*STAGE_GROUPS.values(), DREAMFLOW_PG_job, DREAMFLOW_PG_settings, DREAMFLOW_PG_run)


class DreamFlowPreferences(bpy.types.AddonPreferences):
    """Where the backend is and how to reach it."""

    bl_idname = __package__

    address: StringProperty(name="Backend address", default="tcp://127.0.0.1:5555",
                            description="ZeroMQ address of the DreamFlow backend (dreamflow serve)")
    server_key_file: StringProperty(name="Server public key", subtype="FILE_PATH", default="",
                                    description="server.key of an authenticated (CURVE) remote backend")
    client_key_file: StringProperty(name="Client secret key", subtype="FILE_PATH", default="",
                                    description="This machine's client.key_secret, authorised on that backend")
    timeout: FloatProperty(name="Request timeout (s)", default=10.0, min=0.5, max=600.0)
    heartbeat: FloatProperty(name="Heartbeat (s)", default=1.0, min=0.1, max=60.0,
                             description="How often the connection is checked; lost after three silent beats")
    poll_interval: FloatProperty(name="UI update interval (s)", default=0.1, min=0.02, max=5.0)
    custom_normals: BoolProperty(name="Use the backend's normals", default=False,
                                 description="Store received normals as custom normals (slower import; Blender's "
                                             "smooth normals match them on closed meshes)")
    start_local: BoolProperty(name="Start a local backend", default=False,
                              description="Run dreamflow serve on this machine when connecting, stop it on exit")
    backend_executable: StringProperty(name="Backend executable", subtype="FILE_PATH", default="dreamflow",
                                       description="The dreamflow command (e.g. /path/to/.venv/bin/dreamflow)")
    backend_arguments: StringProperty(name="Arguments", default=DEFAULT_ARGUMENTS,
                                      description="{address} is replaced by the backend address")

    def draw(self, context: bpy.types.Context) -> None:
        """The preferences panel."""
        layout = self.layout
        layout.prop(self, "address")
        if not jobspec.is_local_endpoint(self.address) and not bpy.app.online_access:
            layout.label(text="A remote backend needs Online Access (Preferences > System > Network)", icon="ERROR")
        box = layout.box()
        box.label(text="Authenticated remote backend (optional)")
        box.prop(self, "server_key_file")
        box.prop(self, "client_key_file")
        row = layout.row()
        row.prop(self, "timeout")
        row.prop(self, "heartbeat")
        row.prop(self, "poll_interval")
        layout.prop(self, "custom_normals")
        box = layout.box()
        box.prop(self, "start_local")
        col = box.column()
        col.active = self.start_local
        col.prop(self, "backend_executable")
        col.prop(self, "backend_arguments")
