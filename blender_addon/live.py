"""The main-thread side of the thread boundary: :func:`drain_and_apply` and what it applies.

Threads (see ``session.py``): the protocol Client's socket thread, the preparation thread (the
numpy half of each import) and the request worker never touch ``bpy``; they only fill
thread-safe queues. :func:`drain_and_apply` is the ONE place where
received messages and request outcomes enter Blender: it runs on the main thread, called by a
``bpy.app.timers`` timer in the UI and directly by tests and scripts in background mode (where
timers never fire). It is bounded (``max_messages``, ``time_budget_s``) so the UI stays
responsive, coalesces superseded preview meshes, and never raises: every failure becomes a
message in the panel and in Blender's report area.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable

import bpy
import numpy as np

from . import importer, jobspec
from .backend import LocalBackend
from .properties import TERMINAL_STATES, follow_server_preset
from .session import Outcome, Session, load_curve_keys

_session: Session | None = None
_session_key: tuple | None = None
_held: list[tuple[float, Any]] = []   # events of jobs this file does not know yet (submit still returning)
HOLD_SECONDS = 30.0
#: Seconds the panel shows an error that is not about the connection (the console, Blender's Info
#: log and the job's own row keep it); a connection error stays until the connection is back.
ERROR_SHOW_SECONDS = 120.0
_CLOCK_ZERO = time.monotonic()   # errors are timed from here (a FloatProperty holds float32)
local_backend = LocalBackend()


class Defaults:
    """Preference values used when the add-on's preferences are not available (scripts, tests)."""

    address = "tcp://127.0.0.1:5555"
    server_key_file = ""
    client_key_file = ""
    timeout = 10.0
    heartbeat = 1.0
    poll_interval = 0.1
    custom_normals = False
    start_local = False
    backend_executable = "dreamflow"
    backend_arguments = "serve --bind {address}"


def preferences() -> Any:
    """The add-on preferences (or :class:`Defaults` when the add-on is not registered as such)."""
    addon = bpy.context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None and addon.preferences is not None else Defaults


def run_state() -> Any:
    """The WindowManager's transient run state, or None when there is no window manager."""
    wm = bpy.context.window_manager
    return getattr(wm, "dreamflow", None) if wm is not None else None


def settings(scene: bpy.types.Scene) -> Any:
    """The scene's DreamFlow settings and jobs."""
    return scene.dreamflow


# ------------------------------------------------------------------------------ reporting


def report(level: str, message: str, job: Any = None, about: str = "") -> None:
    """Show ``message`` in the panel, in Blender's report area (UI only) and on the console.

    ``about="connection"`` marks an error that lasts as long as the backend is unreachable.
    """
    print(f"DreamFlow {level.lower()}: {message}")
    state = run_state()
    if level == "ERROR" and state is not None:
        state.last_error = message
        state.last_error_about = about
        state.last_error_at = time.monotonic() - _CLOCK_ZERO
    if job is not None:
        job.message = message
    if bpy.app.background:
        return
    try:
        bpy.ops.dreamflow.report(level=level, message=message[:1000])
    except Exception:
        pass  # an ERROR report also comes back as an exception here; it was still reported
    if level == "ERROR":
        _popup(message)


def clear_error() -> None:
    """Take the last error off the panel."""
    state = run_state()
    if state is not None:
        state.last_error = state.last_error_about = ""


def clear_passed_error(now: float | None = None) -> None:
    """Clear the panel's last error once what it describes has passed.

    A connection error goes as soon as the connection is healthy again (and stays while it is
    not); any other error goes after ``ERROR_SHOW_SECONDS``. ``now``: seconds on this module's clock.
    """
    state = run_state()
    if state is None or not state.last_error:
        return
    now = time.monotonic() - _CLOCK_ZERO if now is None else now
    if state.last_error_about == "connection":
        if state.connection == "CONNECTED":
            clear_error()
    elif now - state.last_error_at > ERROR_SHOW_SECONDS:
        clear_error()


def _popup(message: str) -> None:
    """A small popup near the mouse: errors arrive from a timer, where no operator is running."""
    wm = bpy.context.window_manager
    if wm is None or not wm.windows:
        return

    def draw(menu: Any, _context: Any) -> None:
        for line in wrap_text(message, 90)[:8]:
            menu.layout.label(text=line)

    try:
        with bpy.context.temp_override(window=wm.windows[0]):
            wm.popup_menu(draw, title="DreamFlow", icon="ERROR")
    except Exception:
        traceback.print_exc()


def wrap_text(text: str, width: int) -> list[str]:
    """Words of ``text`` as lines of at most ``width`` characters (panel labels do not wrap)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    if line:
        lines.append(line)
    return lines


def redraw_panels() -> None:
    """Redraw 3D View sidebars so progress shows without moving the mouse."""
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


# ------------------------------------------------------------------------------ session


def check_online_access(address: str) -> None:
    """Raise ValueError when a non-local backend is configured but Blender's online access is off."""
    if not jobspec.is_local_endpoint(address) and not bpy.app.online_access:
        raise ValueError(f"{address} is not on this machine and Blender's online access is off; allow it in "
                         f"Preferences > System > Network, or use a local backend (tcp://127.0.0.1:5555)")


def get_session(create: bool = True) -> Session | None:
    """The session for the current preferences, (re)created when the address or keys changed."""
    global _session, _session_key
    prefs = preferences()
    key = (prefs.address.strip(), prefs.server_key_file, prefs.client_key_file, round(prefs.timeout, 3),
           round(prefs.heartbeat, 3))
    if _session is not None and _session_key == key:
        return _session
    if not create:
        return _session
    address = jobspec.check_endpoint(prefs.address)
    check_online_access(address)
    keys = None
    if prefs.server_key_file or prefs.client_key_file:
        if not (prefs.server_key_file and prefs.client_key_file):
            raise ValueError("an authenticated backend needs both the server public key and the client secret key")
        keys = load_curve_keys(bpy.path.abspath(prefs.server_key_file), bpy.path.abspath(prefs.client_key_file))
    close_session()
    if prefs.start_local and jobspec.is_local_endpoint(address) and not local_backend.running:
        local_backend.start(bpy.path.abspath(prefs.backend_executable) if prefs.backend_executable.startswith("//")
                            else prefs.backend_executable, prefs.backend_arguments, address)
    _session = Session(address, keys=keys, timeout=prefs.timeout, heartbeat=prefs.heartbeat)
    _session_key = key
    state = run_state()
    if state is not None:
        state.connection = "CONNECTING"
        state.connection_message = f"Connecting to {address}"
    _session.connect()
    return _session


def preset_details() -> dict[str, Any] | None:
    """What the connected server said about each preset (runnable, why not, its prompt words); None if unknown."""
    caps = _session.client.capabilities if _session is not None else None
    return (caps or {}).get("preset_details")


def close_session() -> None:
    """Close the current session (its threads stop); unfinished jobs become detached (reattachable)."""
    global _session, _session_key
    if _session is not None:
        _session.close()
        detach_unfinished_jobs("not followed any more: press Reattach to follow this job again")
    _session = None
    _session_key = None
    _held.clear()


def detach_unfinished_jobs(message: str) -> None:
    """Mark every file's unfinished jobs as detached: no session follows them until Reattach."""
    for scene in bpy.data.scenes:
        settings = getattr(scene, "dreamflow", None)
        for job in settings.jobs if settings is not None else ():
            if job.state not in TERMINAL_STATES and not job.job_id.startswith("pending-"):
                job.state = "detached"
                job.message = message


# ------------------------------------------------------------------------------ the drain


def drain_and_apply(scene: bpy.types.Scene | None = None, max_messages: int = 32, time_budget_s: float = 0.05) -> int:
    """Apply what the backend sent since the last call to ``scene``; the number of events applied.

    Main thread only. Takes request outcomes (submitted, cancelled, reattached, failed), the
    connection state, malformed-message notices and up to ``max_messages`` job events, stopping
    early once ``time_budget_s`` is spent (the rest waits for the next call). Never raises.
    """
    session = _session
    if session is None:
        return 0
    try:
        scene = scene or bpy.context.scene
        for outcome in session.poll_outcomes():
            _apply_outcome(scene, outcome)
        _update_connection(session, scene)
        clear_passed_error()
        for problem in session.new_malformed():
            report("ERROR", f"The backend sent a malformed message, ignored: {problem}")
        return _apply_events(scene, session, max_messages, time_budget_s)
    except Exception as exc:  # the drain must never take Blender down
        traceback.print_exc()
        report("ERROR", f"DreamFlow could not apply a backend message: {exc}")
        return 0


def _apply_events(scene: bpy.types.Scene, session: Session, max_messages: int, time_budget_s: float) -> int:
    s = settings(scene)
    start = time.perf_counter()
    now = time.monotonic()
    timed = list(_held) + [(now, r) for r in session.poll_events(max_messages)]
    batch = [r.msg for _, r in timed]
    _held.clear()
    # A non-final mesh is superseded by a later mesh of the same job in the same batch: skip the
    # older one (its seq is still recorded), so a slow UI catches up instead of falling behind.
    last_mesh = {}
    for i, msg in enumerate(batch):
        if msg.type == "mesh":
            last_mesh[msg.job] = i
    applied = 0
    for i, msg in enumerate(batch):
        job = s.find_job(str(msg.job))
        if job is None:
            _held.append(timed[i])
            continue
        if applied and time.perf_counter() - start > time_budget_s:
            _held.extend(timed[i:])
            break
        if msg.seq is not None and msg.seq <= job.last_seq:
            continue  # already applied before this file was saved and reopened
        skip = msg.type == "mesh" and not msg.fields.get("final") and last_mesh.get(msg.job) != i
        if not skip:
            ready = timed[i][1]
            try:
                if ready.error:
                    raise ValueError(ready.error)
                _apply_event(scene, job, msg, ready.prepared)
            except Exception as exc:
                traceback.print_exc()
                report("ERROR", f"Job {job.job_id[:8]}: could not apply its {msg.type} message: {exc}", job)
        if msg.seq is not None:
            job.last_seq = int(msg.seq)
        applied += 1
    # Events for jobs that never show up in this file (another file's job) are dropped after a while.
    _held[:] = [(t, m) for t, m in _held if now - t < HOLD_SECONDS]
    return applied


def _about(outcome: Outcome) -> str:
    """What a failed request's error is about: the connection when no backend answered."""
    return "connection" if outcome.unreachable else ""


def _connected(scene: bpy.types.Scene, outcome: Outcome) -> None:
    state = run_state()
    if outcome.error and local_backend.running:
        # A local backend still importing its libraries: heartbeats will bring the link up.
        if state is not None:
            state.connection = "CONNECTING"
            state.connection_message = f"Waiting for the local backend to start (log: {local_backend.log_path})"
    elif outcome.error:
        if state is not None:
            state.connection = "UNREACHABLE"
            state.connection_message = outcome.error
        report("ERROR", f"Cannot reach the DreamFlow backend: {outcome.error}", about="connection")
    elif state is not None:
        caps = outcome.value or {}
        state.connection = "CONNECTED"
        state.connection_message = ""
        state.server_info = f"{caps.get('server_version', '?')} on {caps.get('device', '?')}"
    if not outcome.error:
        best = jobspec.best_preset((outcome.value or {}).get("preset_details"))
        for each in bpy.data.scenes:
            if getattr(each, "dreamflow", None) is not None:
                follow_server_preset(each.dreamflow, best)


def _submitted(scene: bpy.types.Scene, outcome: Outcome) -> None:
    s = settings(scene)
    placeholder = s.find_job(outcome.context.get("placeholder", ""))
    if outcome.error:
        if placeholder is not None:
            placeholder.state = "failed"
        report("ERROR", f"Could not start the job: {outcome.error}", placeholder, _about(outcome))
        return
    job = placeholder if placeholder is not None else s.jobs.add()
    job.job_id = str(outcome.value)
    job.state = "queued"
    job.message = ""
    s.active_job = list(s.jobs).index(job)


def _cancel_answered(scene: bpy.types.Scene, outcome: Outcome) -> None:
    job = settings(scene).find_job(outcome.context.get("job", ""))
    if outcome.error:
        report("ERROR", f"Could not cancel the job: {outcome.error}", job, _about(outcome))
    elif job is not None and job.state not in TERMINAL_STATES:
        job.state = "cancelling"


def _subscribed(scene: bpy.types.Scene, outcome: Outcome) -> None:
    job = settings(scene).find_job(outcome.context.get("job", ""))
    if outcome.error:
        if job is not None:
            job.state = "detached"
        report("ERROR", f"Could not reattach to the job: {outcome.error}", job, _about(outcome))
    elif job is not None:
        job.state = str((outcome.value or {}).get("state", job.state))
        job.message = "reattached"


#: What each kind of finished request does to the scene (main thread).
_OUTCOME_HANDLERS: dict[str, Callable[[bpy.types.Scene, Outcome], None]] = {
    "connect": _connected, "submit": _submitted, "cancel": _cancel_answered, "subscribe": _subscribed,
}


def _apply_outcome(scene: bpy.types.Scene, outcome: Outcome) -> None:
    handler = _OUTCOME_HANDLERS.get(outcome.kind)
    if handler is not None:
        handler(scene, outcome)


def _update_connection(session: Session, scene: bpy.types.Scene) -> None:
    state = run_state()
    if state is None:
        return
    if session.connected:
        if state.connection != "CONNECTED":
            state.connection = "CONNECTED"
            state.connection_message = ""
            if session.client.capabilities is None and not session.busy:
                session.connect()  # the link came up by heartbeat: ask for the server's details
    elif session.ever_connected and state.connection == "CONNECTED":
        state.connection = "LOST"
        state.connection_message = (f"Lost the connection to {session.endpoint}; retrying, running jobs resume "
                                    f"where they left off")
        report("WARNING", state.connection_message)
    if local_backend.exit_message() and state.connection != "CONNECTED":
        state.connection_message = local_backend.exit_message()


def _on_progress(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    job.state = "running" if job.state not in ("cancelling",) else job.state
    job.stage = f["stage"]
    job.step = int(f["step"])
    job.total = int(f["total"])
    job.eta = -1.0 if f.get("eta") is None else float(f["eta"])
    job.loss = 0.0 if f.get("loss") is None else float(f["loss"])


def _on_preview(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    image = prepared if prepared is not None else importer.prepare_image(msg.arrays.get("image"), "preview image")
    name = job.preview_image or f"DreamFlow preview {job.job_id[:8]}"
    img = importer.write_image(name, image, bpy.data.images.get(name))
    job.preview_image = img.name
    if not bpy.app.background:
        img.preview_ensure()
        img.preview.reload()


def _on_mesh(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    obj = importer.apply_mesh(scene, job.job_id, prepared if prepared is not None else msg.arrays,
                              object_name=job.object_name,
                              object_id=f.get("object_id") or job.object_id, stage=f["stage"], step=int(f["step"]),
                              final=bool(f.get("final")), custom_normals=bool(preferences().custom_normals))
    job.object_name = obj.name
    job.object_id = importer.ensure_object_id(obj)
    job.stage = f["stage"]
    if job.kind == "refine" and not job.modifiers_off:
        # The sent mesh had the modifiers applied; the refined result must not get them twice.
        # Turned off, not removed: the artist can switch them back on.
        names = [m.name for m in obj.modifiers if m.show_viewport or m.show_render]
        for m in obj.modifiers:
            m.show_viewport = m.show_render = False
        job.modifiers_off = True
        if names:
            job.message = f"modifiers {', '.join(names)} were applied before refining and are now off"
    if f.get("final"):
        importer.pack_job_images(obj)


def _on_stage_done(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    job.message = f"{f['stage']} done" + (f" in {f['seconds']:.0f} s" if f.get("seconds") is not None else "")


def _on_job_done(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    job.state = "done"
    job.step = job.total
    job.eta = -1.0
    _pack_job(job)
    job.message = "done" + (f" in {f['seconds']:.0f} s" if f.get("seconds") is not None else "")


def _on_cancelled(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    job.state = "cancelled"
    job.eta = -1.0
    job.message = f"cancelled: {f['reason']}"
    _pack_job(job)   # what it made so far stays, as shown


def _on_error(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    job.state = "failed"
    job.eta = -1.0
    _pack_job(job)
    report("ERROR", f"Job {job.job_id[:8]} failed: {f['message']}", job)


def _on_log(scene: bpy.types.Scene, job: Any, f: dict, msg: Any, prepared: Any) -> None:
    if f["level"] in ("warning", "error"):
        job.message = f["message"]


#: What each kind of job event does to the scene (main thread); see PROTOCOL.md for the kinds.
_EVENT_HANDLERS: dict[str, Callable[..., None]] = {
    "progress": _on_progress, "preview": _on_preview, "mesh": _on_mesh, "stage_done": _on_stage_done,
    "job_done": _on_job_done, "cancelled": _on_cancelled, "error": _on_error, "log": _on_log,
}


def _apply_event(scene: bpy.types.Scene, job: Any, msg: Any, prepared: Any = None) -> None:
    handler = _EVENT_HANDLERS.get(msg.type)
    if handler is not None:
        handler(scene, job, msg.fields, msg, prepared)


def _pack_job(job: Any) -> None:
    """Pack the job's object's textures as they are shown now (a job that ended)."""
    obj = importer.find_object_by_id(job.object_id) or bpy.data.objects.get(job.object_name)
    if obj is not None:
        importer.pack_job_images(obj)


def job_for_object(scene: bpy.types.Scene, obj: bpy.types.Object) -> Any:
    """The scene's job record that last updated ``obj``, if any."""
    s = settings(scene)
    return s.find_job(str(obj.get(importer.JOB_KEY, ""))) if obj is not None else None


def active_job(scene: bpy.types.Scene) -> Any:
    """The job the panel shows progress for."""
    s = settings(scene)
    if 0 <= s.active_job < len(s.jobs):
        return s.jobs[s.active_job]
    return None


# ------------------------------------------------------------------------------ the timer


def timer() -> float:
    """``bpy.app.timers`` callback: drain, redraw, and come back soon while anything is running."""
    try:
        if _session is None:
            clear_passed_error()
            return 0.5
        applied = drain_and_apply(bpy.context.scene)
        redraw_panels()
        prefs = preferences()
        return 0.0 if applied >= 32 else float(prefs.poll_interval)
    except Exception:
        traceback.print_exc()
        return 1.0


def placeholder_id() -> str:
    """A temporary id for a job whose submit has not returned yet."""
    return "pending-" + np.random.default_rng().bytes(6).hex()
