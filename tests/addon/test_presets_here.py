"""The panel starts from the best preset the connected server can run (Paper on a GPU server with the
paper's weights, Preview on a CPU server), shows the others with the reason they cannot run, says
before sending what a toy-world prompt becomes or that it will be refused, and a saved .blend keeps
the preset the artist picked. The servers are real DreamFlow servers (scripted jobs); the GPU one
fakes its CUDA device and reads the paper's weights from the offline Hugging Face cache of tiny
models stored under the real ids (tests/hub/offline_hub.py)."""

from __future__ import annotations

import subprocess

import bpy
import pytest
from addon_helpers import PYTHON, ROOT, ServerProcess, draw_panel, point_at, pump

BUILD_HUB = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
             "from offline_hub import build_offline_hub; build_offline_hub(Path(sys.argv[2]))")


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    """A server whose capabilities see a CUDA device and the paper's weights in its HF cache."""
    home = tmp_path_factory.mktemp("hf-home")
    built = subprocess.run([PYTHON, "-c", BUILD_HUB, str(ROOT / "tests" / "hub"), str(home)], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    srv = ServerProcess(tmp_path_factory.mktemp("gpu-store"), device_type="cuda",
                        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory):
    """A server on a CPU with an empty HF cache: the paper preset cannot run there."""
    srv = ServerProcess(tmp_path_factory.mktemp("cpu-store"), device_type="cpu",
                        env={"HF_HOME": str(tmp_path_factory.mktemp("empty-hf-home")), "HF_HUB_OFFLINE": "1"}).start()
    yield srv
    srv.kill()


def _connect(addon, server: ServerProcess) -> None:
    point_at(server.endpoint)
    assert bpy.ops.dreamflow.connect() == {"FINISHED"}
    state = bpy.context.window_manager.dreamflow
    pump(addon, lambda: state.connection == "CONNECTED" and state.server_info, timeout=60)


def _labels() -> list[str]:
    return [text for kind, text in draw_panel() if kind == "label"]


def test_a_gpu_server_with_the_papers_weights_starts_the_panel_on_paper(addon, gpu_server):
    s = bpy.context.scene.dreamflow
    assert s.preset == "preview" and not s.preset_chosen
    _connect(addon, gpu_server)
    assert s.preset == "paper" and not s.preset_chosen
    assert not any("not on this server" in text or "cannot run" in text for text in _labels())


def test_a_cpu_server_starts_on_preview_and_says_why_paper_cannot_run(addon, cpu_server):
    s = bpy.context.scene.dreamflow
    _connect(addon, cpu_server)
    assert s.preset == "preview"
    shown = " ".join(_labels())
    assert "Paper: not on this server: this server has no CUDA device" in shown
    assert "Reference: not on this server" not in shown and "Smoke: not on this server" not in shown

    # The artist picks Paper anyway: the panel says why and how to fix it, and Generate sends nothing.
    s.preset = "paper"
    assert s.preset_chosen
    shown = " ".join(_labels())
    assert "Paper cannot run on this server" in shown and "dreamflow models fetch --preset paper" in shown
    s.prompt = "a wooden chair"
    with pytest.raises(RuntimeError, match="Paper cannot run on this server"):   # an operator's error report
        bpy.ops.dreamflow.generate()
    assert len(s.jobs) == 0


def test_the_panel_says_what_a_toy_prompt_becomes_or_that_it_will_be_refused(addon, cpu_server):
    s = bpy.context.scene.dreamflow
    _connect(addon, cpu_server)
    assert s.preset == "preview"
    s.prompt = "an orange pyramid"
    assert "Runs as 'an orange square pyramid'" in _labels()
    s.prompt = "a wooden chair"
    shown = " ".join(_labels())
    assert "Will be refused: the toy world does not know the prompt 'a wooden chair'" in shown
    with pytest.raises(RuntimeError, match="the toy world does not know the prompt 'a wooden chair'"):
        bpy.ops.dreamflow.generate()
    assert len(s.jobs) == 0   # refused before sending
    s.prompt = "a red cube"
    assert not any(text.startswith(("Runs as", "Will be refused")) for text in _labels())  # the world's own words

    s.prompt = "an orange pyramid"
    s.extra_overrides = "stage1.steps=2"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    job = s.jobs[0]
    assert job.prompt == job.object_name == "an orange square pyramid"
    pump(addon, lambda: job.state in ("done", "failed"), timeout=60)
    assert job.state == "done", job.message
    status = addon.live.get_session().client.status(job.job_id)
    assert status["prompt"] == "an orange square pyramid"   # the server read it the same way


def test_a_saved_blend_keeps_the_preset_the_artist_picked(addon, gpu_server, tmp_path):
    s = bpy.context.scene.dreamflow
    s.preset = "smoke"
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "picked.blend"))
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "picked.blend"))
    _connect(addon, gpu_server)
    s = bpy.context.scene.dreamflow
    assert s.preset == "smoke" and s.preset_chosen
