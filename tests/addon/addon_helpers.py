"""Helpers of the add-on tests (a module of its own so test files import it by a unique name).

Blender's user folders point into a temporary directory before ``bpy`` is imported, so the tests
never touch the user's own Blender configuration.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

USER_DIR = tempfile.mkdtemp(prefix="dreamflow-blender-user-")
os.environ["BLENDER_USER_RESOURCES"] = USER_DIR

import bpy  # noqa: E402  (after the environment above)

ROOT = Path(__file__).resolve().parents[2]
REPO_MODULE = "dreamflow_test"
ADDON_MODULE = f"bl_ext.{REPO_MODULE}.dreamflow"
REPO_DIR = os.path.join(USER_DIR, "dreamflow_test_repo")
#: The Python of the backend (server, CLI, add-on builder): this one, or the main .venv's when the
#: Blender under test is another version's bpy wheel in its own environment (scripts/blender_versions.py).
PYTHON = os.environ.get("DREAMFLOW_BACKEND_PYTHON") or sys.executable


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_repo() -> None:
    """The temporary user extensions repository the tests install into."""
    repos = bpy.context.preferences.extensions.repos
    if not any(r.module == REPO_MODULE for r in repos):
        repos.new(name="DreamFlow tests", module=REPO_MODULE, custom_directory=REPO_DIR, source="USER")


class ServerProcess:
    """A scripted DreamFlow server in a child process (real Server, scripted pipeline)."""

    def __init__(self, store: Path, port: int | None = None, step_seconds: float = 0.05, later_meshes: int = 0,
                 device_type: str | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.store = store
        self.step_seconds = step_seconds
        self.later_meshes = later_meshes
        self.device_type = device_type   # what its capabilities say jobs run on (scripted_server --device-type)
        self.env = env                   # extra environment (e.g. HF_HOME of a cache with the paper's weights)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        """Start it (output to a log file beside its store) and wait until it answers a hello."""
        from dreamflow_protocol import Client

        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.store.with_name(self.store.name + f"-{self.port}.log"), "ab")
        script = str(Path(__file__).with_name("scripted_server.py"))
        device = ["--device-type", self.device_type] if self.device_type else []
        self.proc = subprocess.Popen([PYTHON, script, "--bind", self.endpoint, "--store", str(self.store),
                                      "--step-seconds", str(self.step_seconds), "--later-meshes", str(self.later_meshes),
                                      *device], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        log.close()
        with Client(self.endpoint, timeout=60) as client:
            assert client.capabilities["protocol"] == 1
        return self

    def kill(self) -> None:
        """Stop it at once (a vanished backend)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def point_at(endpoint: str) -> None:
    """Set the add-on's backend address."""
    bpy.context.preferences.addons[ADDON_MODULE].preferences.address = endpoint


def pump(module, until, timeout: float = 20.0, scene=None) -> None:
    """Call the add-on's drain function (timers never fire in background mode) until ``until()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        module.live.drain_and_apply(scene or bpy.context.scene)
        if until():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not reached within {timeout} s; last error: "
                         f"{bpy.context.window_manager.dreamflow.last_error!r}")


class RecordingLayout:
    """Stands in for bpy.types.UILayout: checks each call's target exists and records it."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.alert = self.active = self.enabled = False
        self.scale_y = 1.0

    def _child(self, *args, **kwargs) -> "RecordingLayout":
        return RecordingLayout(self.log)

    row = column = box = split = _child

    def prop(self, data, name: str, **kwargs) -> None:
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no property {name!r}"
        self.log.append(("prop", name))

    def label(self, text: str = "", icon: str = "NONE", **kwargs) -> None:
        assert icon in bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items
        self.log.append(("label", text))

    def operator(self, idname: str, **kwargs):
        module, name = idname.split(".")
        op = getattr(getattr(bpy.ops, module), name)
        props = op.get_rna_type().properties
        self.log.append(("operator", idname))

        class Props:
            def __setattr__(self, key, value):
                assert key in props, f"{idname} has no property {key!r}"

        return Props()

    def progress(self, factor: float = 0.0, type: str = "BAR", text: str = "") -> None:
        assert 0.0 <= factor <= 1.0
        self.log.append(("progress", text))

    def template_list(self, listtype, list_id, data, propname, active_data, active_propname, **kwargs) -> None:
        assert propname in data.bl_rna.properties and active_propname in active_data.bl_rna.properties
        assert hasattr(bpy.types, listtype)
        self.log.append(("list", propname))

    def template_icon(self, icon_value: int = 0, scale: float = 1.0) -> None:
        self.log.append(("icon", icon_value))


def draw_panel() -> list:
    """Draw the sidebar panel into a RecordingLayout; what it recorded, in order."""
    log: list = []
    panel = bpy.types.DREAMFLOW_PT_main
    helpers = {name: getattr(panel, name) for name in dir(panel) if name.startswith("_draw_")}
    panel.draw(SimpleNamespace(layout=RecordingLayout(log), **helpers), bpy.context)
    return log
