"""The sidebar panel (3D View > N > DreamFlow): settings, run controls, progress, preview, jobs."""

from __future__ import annotations

import bpy

from . import jobspec, live
from .properties import STATE_ICONS, TERMINAL_STATES

CONNECTION_ICONS = {"IDLE": "UNLINKED", "CONNECTING": "TIME", "CONNECTED": "LINKED", "LOST": "ERROR",
                    "UNREACHABLE": "ERROR"}


class DREAMFLOW_UL_jobs(bpy.types.UIList):
    """This file's jobs, newest last."""

    bl_idname = "DREAMFLOW_UL_jobs"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):  # noqa: D102
        row = layout.row(align=True)
        label = item.object_name or item.prompt[:32] or item.job_id[:8]
        row.label(text=f"{label} ({item.kind})", icon=STATE_ICONS.get(item.state, "QUESTION"))
        row.label(text=item.state)
        if not item.job_id.startswith("pending-"):
            op = row.operator("dreamflow.reattach", text="", icon="FILE_REFRESH")
            op.job_id = item.job_id
            if item.state not in TERMINAL_STATES:
                op = row.operator("dreamflow.cancel", text="", icon="CANCEL")
                op.job_id = item.job_id
        op = row.operator("dreamflow.remove_job", text="", icon="TRASH")
        op.job_id = item.job_id


class DREAMFLOW_PT_main(bpy.types.Panel):
    """Generate textured 3D assets from a prompt with DreamFlow."""

    bl_idname = "DREAMFLOW_PT_main"
    bl_label = "DreamFlow"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DreamFlow"

    def draw(self, context: bpy.types.Context) -> None:
        """Draw the panel."""
        layout = self.layout
        s = context.scene.dreamflow
        state = context.window_manager.dreamflow
        self._draw_connection(layout, state)

        details = live.preset_details()
        col = layout.column()
        _text_prop(col, s, "prompt", "Prompt")
        self._draw_prompt_reading(col, s, details)
        _text_prop(col, s, "negative_prompt", "Negative prompt")
        row = col.row(align=True)
        row.prop(s, "seed")
        row.prop(s, "method", text="")
        col.prop(s, "preset")
        self._draw_presets_here(col, s, details)

        box = layout.box()
        box.prop(s, "show_stages", icon="TRIA_DOWN" if s.show_stages else "TRIA_RIGHT", emboss=False)
        if s.show_stages:
            for name in jobspec.STAGES:
                g = getattr(s, name)
                sub = box.column(align=True)
                head = sub.row(align=True)
                head.prop(g, "enabled", text=jobspec.STAGE_LABELS[name])
                head.prop(g, "customize", text="", icon="PREFERENCES")
                if g.enabled and g.customize:
                    sub.prop(g, "resolution")
                    r = sub.row(align=True)
                    r.prop(g, "t_start")
                    r.prop(g, "t_end")
                    sub.prop(g, "views_per_t")
                    sub.prop(g, "steps")
            _text_prop(box, s, "extra_overrides", "key=value; key=value")

        job = live.active_job(context.scene)
        running = job is not None and job.state not in TERMINAL_STATES and job.state != "detached"
        row = layout.row(align=True)
        row.scale_y = 1.4
        row.operator("dreamflow.generate", icon="PLAY")
        sub = row.row(align=True)
        sub.enabled = running
        sub.operator("dreamflow.cancel", icon="CANCEL")

        if job is not None:
            self._draw_progress(layout, job)
            image = bpy.data.images.get(job.preview_image) if job.preview_image else None
            if image is not None and image.preview is not None:
                layout.template_icon(icon_value=image.preview.icon_id, scale=8.0)
        if state.last_error:
            box = layout.box()
            box.alert = True
            box.label(text=state.last_error[:120], icon="ERROR")

        box = layout.box()
        box.label(text="Refine the active mesh", icon="MOD_REMESH")
        row = box.row(align=True)
        row.prop(s, "refine_start_stage", text="")
        row.prop(s, "refine_start_t")
        box.operator("dreamflow.refine_selected", icon="EXPORT")

        layout.label(text="Jobs in this file")
        layout.template_list("DREAMFLOW_UL_jobs", "", s, "jobs", s, "active_job", rows=3)

    @staticmethod
    def _draw_connection(layout: bpy.types.UILayout, state: bpy.types.PropertyGroup) -> None:
        row = layout.row(align=True)
        label = state.bl_rna.properties["connection"].enum_items[state.connection].name
        if state.connection == "CONNECTED" and state.server_info:
            label = f"Connected: {state.server_info}"
        row.alert = state.connection in ("LOST", "UNREACHABLE")
        row.label(text=label, icon=CONNECTION_ICONS.get(state.connection, "QUESTION"))
        row.operator("dreamflow.connect", text="", icon="FILE_REFRESH")
        if live.local_backend.running:
            row.operator("dreamflow.stop_backend", text="", icon="QUIT")
        if state.connection_message:
            box = layout.box()
            box.alert = state.connection in ("LOST", "UNREACHABLE")
            for line in live.wrap_text(state.connection_message, 60)[:4]:
                box.label(text=line)

    @staticmethod
    def _draw_prompt_reading(layout: bpy.types.UILayout, s: bpy.types.PropertyGroup, details: dict | None) -> None:
        """What the server will make of the prompt, said before it is sent: its toy-world form, or the refusal."""
        runs_as, refusal = jobspec.prompt_reading(s.prompt, s.preset, details, s.extra_overrides)
        if refusal:
            box = layout.box()
            box.alert = True
            for i, line in enumerate(live.wrap_text(f"Will be refused: {refusal}", 60)[:6]):
                box.label(text=line, icon="ERROR" if i == 0 else "NONE")
        elif runs_as != s.prompt.strip():
            layout.label(text=f"Runs as {runs_as!r}", icon="INFO")

    @staticmethod
    def _draw_presets_here(layout: bpy.types.UILayout, s: bpy.types.PropertyGroup, details: dict | None) -> None:
        """The chosen preset's problem on this server (with the fix), and the other presets that cannot run here."""
        problem = jobspec.not_runnable(s.preset, details)
        if problem:
            box = layout.box()
            box.alert = True
            for i, line in enumerate(live.wrap_text(problem, 60)[:10]):   # the fix comes last: all of it
                box.label(text=line, icon="ERROR" if i == 0 else "NONE")
        for preset in jobspec.PRESETS:
            if preset == s.preset or not jobspec.not_runnable(preset, details):
                continue
            reason = jobspec.preset_detail(preset, details).get("reason", "")
            sub = layout.column(align=True)
            sub.active = False
            lines = live.wrap_text(f"{jobspec.PRESET_LABELS[preset]}: not on this server: {reason}", 60)[:3]
            for i, line in enumerate(lines):
                sub.label(text=line, icon="CANCEL" if i == 0 else "NONE")

    @staticmethod
    def _draw_progress(layout: bpy.types.UILayout, job: bpy.types.PropertyGroup) -> None:
        factor = job.step / job.total if job.total > 0 else (1.0 if job.state == "done" else 0.0)
        eta = jobspec.format_eta(job.eta if job.eta >= 0 else None)
        text = f"{job.stage or job.state} {job.step}/{job.total}" + (f"  ETA {eta}" if eta else "")
        if job.state in TERMINAL_STATES:
            text = job.state
        layout.progress(factor=factor, type="BAR", text=text)
        if job.message:
            layout.label(text=job.message[:120])


_HAS_PLACEHOLDER = "placeholder" in bpy.types.UILayout.bl_rna.functions["prop"].parameters


def _text_prop(layout: bpy.types.UILayout, data: bpy.types.AnyType, name: str, hint: str) -> None:
    """A text field with a greyed hint where Blender supports one (4.1+), else with its label."""
    if _HAS_PLACEHOLDER:
        layout.prop(data, name, text="", placeholder=hint)
    else:
        layout.prop(data, name)


CLASSES = (DREAMFLOW_UL_jobs, DREAMFLOW_PT_main)
