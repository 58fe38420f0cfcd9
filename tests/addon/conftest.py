"""Fixtures for the add-on tests: real Blender (the bpy module), the built extension installed with
Blender's own installer, and a real DreamFlow server on loopback in a child process.

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

import pytest

_USER_DIR = tempfile.mkdtemp(prefix="dreamflow-blender-user-")
os.environ["BLENDER_USER_RESOURCES"] = _USER_DIR

import bpy  # noqa: E402  (after the environment above)

ROOT = Path(__file__).resolve().parents[2]
REPO_MODULE = "dreamflow_test"
ADDON_MODULE = f"bl_ext.{REPO_MODULE}.dreamflow"
REPO_DIR = os.path.join(_USER_DIR, "dreamflow_test_repo")
PYTHON = sys.executable


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


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The extension zip built by scripts/build_addon.py (Blender's builder; wheels from the cache)."""
    out = tmp_path_factory.mktemp("addon-dist")
    proc = subprocess.run([PYTHON, str(ROOT / "scripts" / "build_addon.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def installed(extension_zip) -> dict:
    """Install the zip once with Blender's extension installer; what the installer reported."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    add_repo()
    result = bpy.ops.extensions.package_install_files(filepath=str(extension_zip), repo=REPO_MODULE,
                                                      enable_on_install=True)
    site = os.path.join(_USER_DIR, "extensions", ".local", "lib", "python3.11", "site-packages")
    return {"result": result, "enabled": ADDON_MODULE in bpy.context.preferences.addons, "zip": extension_zip,
            "site_packages": sorted(os.listdir(site)) if os.path.isdir(site) else []}


@pytest.fixture
def addon(installed):
    """A fresh empty Blender file with the installed extension enabled; the add-on's module."""
    import addon_utils

    bpy.ops.wm.read_factory_settings(use_empty=True)
    add_repo()
    module = addon_utils.enable(ADDON_MODULE, default_set=True)
    assert module is not None, "the installed extension failed to enable"
    prefs = bpy.context.preferences.addons[ADDON_MODULE].preferences
    prefs.timeout = 5.0
    prefs.heartbeat = 0.2
    yield module
    module.live.close_session()
    addon_utils.disable(ADDON_MODULE, default_set=True)


class ServerProcess:
    """A scripted DreamFlow server in a child process (real Server, scripted pipeline)."""

    def __init__(self, store: Path, port: int | None = None, step_seconds: float = 0.05) -> None:
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.store = store
        self.step_seconds = step_seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        """Start it and wait until it listens."""
        self.proc = subprocess.Popen([PYTHON, str(Path(__file__).with_name("scripted_server.py")), "--bind", self.endpoint,
                                      "--store", str(self.store), "--step-seconds", str(self.step_seconds)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening"):
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"scripted server did not start: {self.proc.stdout.read()}")

    def kill(self) -> None:
        """Stop it at once (a vanished backend)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One scripted server for the session."""
    srv = ServerProcess(tmp_path_factory.mktemp("store")).start()
    yield srv
    srv.kill()


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


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """`dreamflow serve` itself (the real pipeline) on a free loopback port."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    exe = Path(PYTHON).with_name("dreamflow")
    proc = subprocess.Popen([str(exe), "serve", "--bind", endpoint, "--store", str(tmp_path_factory.mktemp("real-store"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from dreamflow_protocol import Client

        with Client(endpoint, timeout=60) as client:
            assert client.capabilities["protocol"] == 1
        yield endpoint
    finally:
        proc.kill()
        proc.wait(10)
