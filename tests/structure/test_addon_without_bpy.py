"""The add-on's session (threads, queues, the protocol client) and its mesh preparation are plain
Python: they import in an interpreter where ``bpy`` cannot be imported, and never pull in torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, types
sys.modules["bpy"] = None          # ``import bpy`` raises ImportError from here on
sys.modules["torch"] = None        # and so does ``import torch``: the add-on never needs it
package = types.ModuleType("blender_addon")   # the package without its __init__ (which registers with Blender)
package.__path__ = [sys.argv[1]]
sys.modules["blender_addon"] = package
for name in sys.argv[2:]:
    __import__("blender_addon." + name)
print("imported", *sys.argv[2:])
"""


def _import_without_bpy(*names: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared")}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "blender_addon"), *names],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_session_and_meshprep_import_without_bpy():
    r = _import_without_bpy("session", "meshprep")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported session meshprep"


def test_the_check_does_catch_a_module_that_needs_bpy():
    """The same harness refuses the Blender-side importer, which does need bpy."""
    r = _import_without_bpy("importer")
    assert r.returncode != 0 and "bpy" in r.stderr
