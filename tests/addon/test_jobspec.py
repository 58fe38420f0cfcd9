"""The panel's settings -> the job spec: every dotted path the add-on sends is one the backend's
typed configuration accepts, with the meaning the panel gives it. Also the timer never raises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import bpy
import pytest
from dreamflow.config import ConfigError
from dreamflow.pipeline.config import build_config

_SPEC = importlib.util.spec_from_file_location(
    "dreamflow_addon_jobspec", Path(__file__).resolve().parents[2] / "blender_addon" / "jobspec.py")
jobspec = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = jobspec
_SPEC.loader.exec_module(jobspec)   # loaded on its own: it must not need bpy


def test_customised_stages_map_onto_the_backend_config():
    stages = {
        "stage1": jobspec.StageSettings(True, True, 96, 0.9, 0.3, 2, 123),
        "geometry": jobspec.StageSettings(False, True, 256, 0.8, 0.4, 1, 10),
        "texture": jobspec.StageSettings(True, False),
        "refine": jobspec.StageSettings(True, True, 128, 0.25, 0.05, 3, 7),
    }
    args = jobspec.submit_arguments(" a red teapot ", "", 7, "apfo", "preview", stages, "prior.kind=reference")
    assert args["prompt"] == "a red teapot" and args["negative_prompt"] is None
    cfg = build_config(args["preset"], args["overrides"], prompt=args["prompt"], seed=args["seed"],
                       method=args["method"])
    assert args["preset"] == "toy"  # the panel's Preview is the toy-world text-to-3D preset
    preview = build_config(args["preset"])
    assert (cfg.stage1.resolution, cfg.stage1.steps) == (96, 123)
    assert (cfg.stage1.method.schedule.t_start, cfg.stage1.method.schedule.t_end,
            cfg.stage1.method.schedule.views_per_t) == (0.9, 0.3, 2)
    # A disabled stage sends no values; a stage not customised keeps the preset's.
    assert cfg.geometry.enabled is False and cfg.geometry.steps == preview.geometry.steps
    assert cfg.texture == preview.texture
    assert (cfg.refine.resolution, cfg.refine.steps, cfg.refine.method.schedule.t_start) == (128, 7, 0.25)
    assert cfg.prior.kind == "reference" and cfg.seed == 7


@pytest.mark.parametrize("method", ["vsd", "sds", "fsd"])
def test_every_method_accepts_the_overrides(method):
    stages = {name: jobspec.StageSettings(True, True, 64, 0.7, 0.1, 1, 20) for name in jobspec.STAGES}
    args = jobspec.submit_arguments("x", "y", 0, method, "smoke", stages)
    cfg = build_config(args["preset"], args["overrides"], method=method)
    assert cfg.method == method and cfg.texture.method.schedule.t_start == 0.7


def test_the_panel_presets_name_backend_presets():
    from dreamflow.pipeline.config import PRESETS

    assert set(jobspec.BACKEND_PRESETS) == set(jobspec.PRESETS)
    assert set(jobspec.BACKEND_PRESETS.values()) <= set(PRESETS)
    assert jobspec.submit_arguments("a red cube", "", 0, "apfo", "reference", {})["preset"] == "preview"
    # Preview's toy prior refuses a prompt its world does not know, before anything is computed.
    args = jobspec.submit_arguments("a wooden chair", "", 0, "apfo", "preview", {})
    with pytest.raises(ConfigError, match="toy world"):
        build_config(args["preset"], args["overrides"], prompt=args["prompt"])


def test_the_servers_preset_details_choose_the_start_and_refuse_before_sending():
    from dreamflow.server.presets import preset_details

    cpu, gpu = preset_details("cpu"), {**preset_details("cpu"), "paper": {"runnable": True}}
    assert jobspec.best_preset(gpu) == "paper" and jobspec.best_preset(cpu) == "preview"
    assert jobspec.best_preset(None) is None and jobspec.not_runnable("paper", None) == ""   # an older server
    assert jobspec.not_runnable("paper", cpu).startswith("Paper cannot run on this server: this server has no CUDA")
    assert all(jobspec.not_runnable(p, cpu) == "" for p in ("preview", "reference", "smoke"))
    with pytest.raises(ValueError, match="Paper cannot run"):
        jobspec.submit_arguments("a chair", "", 0, "apfo", "paper", {}, details=cpu)
    assert jobspec.submit_arguments("a chair", "", 0, "apfo", "paper", {}, details=gpu)["preset"] == "paper"
    # Preview (the backend's toy preset) reads prompts with the words the server published.
    assert jobspec.prompt_reading("a orange ball", "preview", cpu) == ("an orange sphere", "")
    assert jobspec.prompt_reading("a orange ball", "smoke", cpu) == ("a orange ball", "")
    assert "unknown word: chair" in jobspec.prompt_reading("a red chair", "preview", cpu)[1]
    with pytest.raises(ValueError, match="toy world does not know"):
        jobspec.submit_arguments("a red chair", "", 0, "apfo", "preview", {}, details=cpu)
    # Another prior named in the extra overrides leaves the prompt to the server.
    assert jobspec.prompt_reading("a red chair", "preview", cpu, "prior.kind=reference") == ("a red chair", "")


def test_bad_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="prompt"):
        jobspec.submit_arguments("  ", "", 0, "apfo", "smoke", {})
    with pytest.raises(ValueError, match="t end <= t start"):
        jobspec.stage_overrides("stage1", jobspec.StageSettings(True, True, 64, 0.2, 0.5, 1, 10))
    with pytest.raises(ValueError, match="key=value"):
        jobspec.parse_extra_overrides("prior.kind")
    # A typo in an extra override reaches the backend, which names it.
    args = jobspec.submit_arguments("x", "", 0, "apfo", "smoke", {}, "stage1.stepz=3")
    with pytest.raises(ConfigError, match="stepz"):
        build_config(args["preset"], args["overrides"])


def test_override_values_and_addresses_parse():
    assert jobspec.parse_extra_overrides("a.b=1; c=0.5\nd=true;e=null; f=text") == \
        {"a.b": 1, "c": 0.5, "d": True, "e": None, "f": "text"}
    assert jobspec.is_local_endpoint("tcp://127.0.0.1:5555") and jobspec.is_local_endpoint("tcp://localhost:1")
    assert jobspec.is_local_endpoint("ipc:///tmp/df") and not jobspec.is_local_endpoint("tcp://gpu-box:5555")
    assert jobspec.check_endpoint(" tcp://gpu-box:5555 ") == "tcp://gpu-box:5555"
    for bad in ("127.0.0.1:5555", "tcp://host", "http://x:1"):
        with pytest.raises(ValueError, match="tcp://127.0.0.1:5555"):
            jobspec.check_endpoint(bad)
    assert jobspec.format_eta(83.2) == "1m 23s" and jobspec.format_eta(7300) == "2h 01m"
    assert jobspec.format_eta(None) == ""


def test_timer_survives_a_broken_scene(addon, server, monkeypatch):
    """The UI timer swallows any failure in the drain and keeps polling."""
    from addon_helpers import point_at

    point_at(server.endpoint)
    addon.live.get_session()
    assert addon.live.timer() > 0
    monkeypatch.setattr(addon.live, "_apply_events", lambda *a: 1 / 0)
    assert addon.live.drain_and_apply(bpy.context.scene) == 0
    assert "division by zero" in bpy.context.window_manager.dreamflow.last_error
    assert addon.live.timer() > 0
