"""Fixtures for the add-on tests: real Blender (the bpy module), the built extension installed with
Blender's own installer, and a real DreamFlow server on loopback in a child process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# addon_helpers points Blender's user folders at a temporary directory before bpy is imported.
from addon_helpers import ADDON_MODULE, PYTHON, REPO_MODULE, ROOT, USER_DIR, ServerProcess, add_repo, free_port

import bpy
import pytest


def pytest_report_header(config) -> str:
    """Which Blender runs these tests (several versions do: scripts/blender_versions.py)."""
    return f"bpy {'.'.join(map(str, bpy.app.version))} (Blender as a Python module)"


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The extension zip built by scripts/build_addon.py (Blender's builder; wheels from the cache), or the
    one named by DREAMFLOW_ADDON_ZIP (built once by the run that tests every Blender version)."""
    if os.environ.get("DREAMFLOW_ADDON_ZIP"):
        return Path(os.environ["DREAMFLOW_ADDON_ZIP"])
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
    site = os.path.join(USER_DIR, "extensions", ".local", "lib", "python3.11", "site-packages")
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


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One scripted server for the session."""
    srv = ServerProcess(tmp_path_factory.mktemp("store")).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """`dreamflow serve` itself (the real pipeline) on a free loopback port."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    exe = Path(PYTHON).with_name("dreamflow")
    store = tmp_path_factory.mktemp("real-store")
    with open(store.with_name("real-server.log"), "ab") as log:
        proc = subprocess.Popen([str(exe), "serve", "--bind", endpoint, "--store", str(store)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        from dreamflow_protocol import Client

        with Client(endpoint, timeout=60) as client:
            assert client.capabilities["protocol"] == 1
        yield endpoint
    finally:
        proc.kill()
        proc.wait(10)
