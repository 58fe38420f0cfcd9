"""Operators: generate, cancel, reattach, refine the selected mesh, connect, local backend, report.

Operators only read settings and hand requests to the session's worker; they return at once.
What the backend answers arrives through ``live.drain_and_apply``.
"""

from __future__ import annotations

import bpy
from bpy.props import EnumProperty, StringProperty

from . import importer, jobspec, live
from .properties import TERMINAL_STATES


def _session_or_report(op: bpy.types.Operator) -> "live.Session | None":
    try:
        return live.get_session()
    except (ValueError, OSError) as exc:
        state = live.run_state()
        if state is not None:
            state.connection = "UNREACHABLE"
            state.connection_message = str(exc)
        op.report({"ERROR"}, str(exc))
        return None


def _new_job(scene: bpy.types.Scene, kind: str, prompt: str, object_name: str = "", object_id: str = "") -> str:
    s = scene.dreamflow
    job = s.jobs.add()
    job.job_id = live.placeholder_id()
    job.kind = kind
    job.prompt = prompt
    job.object_name = object_name
    job.object_id = object_id
    job.state = "submitting"
    s.active_job = len(s.jobs) - 1
    live.clear_error()   # the artist moved on: an earlier error is no longer the news
    return job.job_id


class DREAMFLOW_OT_generate(bpy.types.Operator):
    """Send the prompt and settings to the backend; the result appears in the scene as it is made"""

    bl_idname = "dreamflow.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Submit a new job."""
        s = context.scene.dreamflow
        details = live.preset_details()
        try:
            args = jobspec.submit_arguments(s.prompt, s.negative_prompt, s.seed, s.method, s.preset,
                                            s.stage_settings(), s.extra_overrides, details)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        session = _session_or_report(self)
        if session is None:
            return {"CANCELLED"}
        runs_as = jobspec.prompt_reading(args["prompt"], s.preset, details, s.extra_overrides)[0]
        placeholder = _new_job(context.scene, "generate", runs_as, object_name=runs_as[:48])
        session.submit({"placeholder": placeholder}, **args)
        self.report({"INFO"}, "DreamFlow job sent" + (f", using {runs_as!r}" if runs_as != args["prompt"] else ""))
        return {"FINISHED"}


class DREAMFLOW_OT_refine_selected(bpy.types.Operator):
    """Send the active mesh (modifiers applied, UVs, image texture) to be refined; the result updates it in place"""

    bl_idname = "dreamflow.refine_selected"
    bl_label = "Refine Selected"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """A mesh object must be active."""
        obj = context.active_object
        return obj is not None and obj.type == "MESH"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Submit the edited mesh as a job's input."""
        s = context.scene.dreamflow
        obj = context.active_object
        # An object DreamFlow made keeps its prompt unless the panel says otherwise.
        earlier = live.job_for_object(context.scene, obj)
        prompt = s.prompt if s.prompt.strip() or earlier is None else earlier.prompt
        try:
            args = jobspec.submit_arguments(prompt, s.negative_prompt, s.seed, s.method, s.preset,
                                            s.stage_settings(), s.extra_overrides, live.preset_details())
            mesh = importer.extract_refine_input(obj, context.evaluated_depsgraph_get())
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        session = _session_or_report(self)
        if session is None:
            return {"CANCELLED"}
        object_id = importer.ensure_object_id(obj)
        placeholder = _new_job(context.scene, "refine", args["prompt"], object_name=obj.name, object_id=object_id)
        session.submit({"placeholder": placeholder}, mesh=mesh, start_stage=s.refine_start_stage,
                       start_t=float(s.refine_start_t), object_id=object_id, **args)
        self.report({"INFO"}, f"Sent {obj.name} for refinement from {s.refine_start_stage}")
        return {"FINISHED"}


class DREAMFLOW_OT_cancel(bpy.types.Operator):
    """Stop the job; what it made so far stays in the scene"""

    bl_idname = "dreamflow.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    job_id: StringProperty(name="Job", default="", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Ask the backend to stop the job (the active one unless ``job_id`` is given)."""
        s = context.scene.dreamflow
        job = s.find_job(self.job_id) if self.job_id else live.active_job(context.scene)
        if job is None or job.state in TERMINAL_STATES or job.job_id.startswith("pending-"):
            self.report({"WARNING"}, "No running job to cancel")
            return {"CANCELLED"}
        session = _session_or_report(self)
        if session is None:
            return {"CANCELLED"}
        job.state = "cancelling"
        session.cancel(job.job_id)
        return {"FINISHED"}


class DREAMFLOW_OT_reattach(bpy.types.Operator):
    """Follow this job again from the last update this file saw (after reopening the file or a lost connection)"""

    bl_idname = "dreamflow.reattach"
    bl_label = "Reattach"
    bl_options = {"REGISTER"}

    job_id: StringProperty(name="Job", default="", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Subscribe to the job from its last seen sequence number + 1."""
        s = context.scene.dreamflow
        job = s.find_job(self.job_id) if self.job_id else live.active_job(context.scene)
        if job is None or job.job_id.startswith("pending-"):
            self.report({"WARNING"}, "No such job")
            return {"CANCELLED"}
        session = _session_or_report(self)
        if session is None:
            return {"CANCELLED"}
        s.active_job = list(s.jobs).index(job)
        session.subscribe(job.job_id, job.last_seq + 1)
        return {"FINISHED"}


class DREAMFLOW_OT_remove_job(bpy.types.Operator):
    """Forget this job in this file (the object stays)"""

    bl_idname = "dreamflow.remove_job"
    bl_label = "Remove Job"
    bl_options = {"REGISTER", "UNDO"}

    job_id: StringProperty(name="Job", default="", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Remove the job record."""
        s = context.scene.dreamflow
        for i, job in enumerate(s.jobs):
            if job.job_id == self.job_id:
                s.jobs.remove(i)
                s.active_job = min(s.active_job, len(s.jobs) - 1)
                return {"FINISHED"}
        return {"CANCELLED"}


class DREAMFLOW_OT_connect(bpy.types.Operator):
    """Connect to the backend set in the add-on preferences (starting a local one if enabled there)"""

    bl_idname = "dreamflow.connect"
    bl_label = "Connect"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """(Re)connect."""
        live.close_session()
        try:
            live.get_session()
        except (ValueError, OSError) as exc:
            state = live.run_state()
            if state is not None:
                state.connection = "UNREACHABLE"
                state.connection_message = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class DREAMFLOW_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend this Blender started"""

    bl_idname = "dreamflow.stop_backend"
    bl_label = "Stop Local Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Stop the child process and drop the connection."""
        live.close_session()
        live.local_backend.stop()
        state = live.run_state()
        if state is not None:
            state.connection = "IDLE"
            state.connection_message = "Local backend stopped"
        return {"FINISHED"}


class DREAMFLOW_OT_report(bpy.types.Operator):
    """Show a DreamFlow message in Blender's report area (used by the update timer)"""

    bl_idname = "dreamflow.report"
    bl_label = "DreamFlow Message"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=[("INFO", "Info", ""), ("WARNING", "Warning", ""), ("ERROR", "Error", "")],
                        default="INFO")
    message: StringProperty()

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Report the message."""
        self.report({self.level}, self.message)
        return {"FINISHED"}


CLASSES = (DREAMFLOW_OT_generate, DREAMFLOW_OT_refine_selected, DREAMFLOW_OT_cancel, DREAMFLOW_OT_reattach,
           DREAMFLOW_OT_remove_job, DREAMFLOW_OT_connect, DREAMFLOW_OT_stop_backend, DREAMFLOW_OT_report)
