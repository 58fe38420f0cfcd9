"""A pytest plugin for runs inside a ``bpy`` module build: record the result, then leave at once.

Loaded with ``-p blender_exit_guard`` by ``scripts/blender_versions.py``. After every other
plugin has finished (junit XML written, summary printed) it writes pytest's exit status to the
file named by ``DREAMFLOW_RESULT_STATUS`` and ends the process with ``os._exit``, which skips the
C exit handlers where bpy 4.2 segfaults and bpy 4.5 can hang. The runner judges the run by that
file and the junit XML, so even if leaving fails in some new way, the results already count.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

_exitstatus: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember pytest's exit status (reports are written in the hooks that run around this one)."""
    global _exitstatus
    _exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Write the status file atomically, flush, and leave without Blender's exit handlers."""
    path = os.environ.get("DREAMFLOW_RESULT_STATUS")
    if not path or _exitstatus is None:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"exitstatus": _exitstatus}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exitstatus)
