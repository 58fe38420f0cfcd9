"""The capabilities say per preset whether it can run on this server and, if not, why and the fix:
the paper preset needs a CUDA device and its weights (looked up without the network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dreamflow.server import presets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from offline_hub import PAPER_MODELS, build_offline_hub  # noqa: E402


@pytest.fixture(scope="module")
def paper_weights(tmp_path_factory) -> Path:
    """An HF_HOME holding the paper's models under their ids (tiny, random)."""
    return build_offline_hub(tmp_path_factory.mktemp("hf-home"))


def _use_hub(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_cpu_server_without_weights_says_why_paper_cannot_run(make_server, make_client, monkeypatch, tmp_path):
    _use_hub(monkeypatch, tmp_path / "empty-hf-home")
    monkeypatch.setattr(presets, "serving_device", lambda facts=None: "cpu")
    caps = make_client(make_server().endpoint).capabilities
    details = caps["preset_details"]
    assert caps["presets"] == list(details) == ["paper", "preview", "toy", "smoke"]  # every preset is still listed
    paper = details["paper"]
    assert paper["runnable"] is False
    assert "no CUDA device" in paper["reason"]
    assert all(f"{model} (" in paper["reason"] for model in PAPER_MODELS)
    assert "`dreamflow models fetch --preset paper`" in paper["fix"]
    assert all(details[p] == {"runnable": True, **({"prompts": details["toy"]["prompts"]} if p == "toy" else {})}
               for p in ("preview", "toy", "smoke"))
    assert "square pyramid" in details["toy"]["prompts"]["shapes"]
    assert details["toy"]["prompts"]["synonyms"]["pyramid"] == "square pyramid"


def test_paper_is_runnable_with_cuda_and_its_weights_and_a_fetch_shows_at_the_next_hello(
        make_server, make_client, monkeypatch, tmp_path, paper_weights):
    monkeypatch.setattr(presets, "serving_device", lambda facts=None: "cuda")
    _use_hub(monkeypatch, tmp_path / "empty-hf-home")
    srv = make_server()
    before = make_client(srv.endpoint).capabilities["preset_details"]["paper"]
    assert before["runnable"] is False and "no CUDA" not in before["reason"]
    assert before["reason"].startswith("weights not on this server: ")
    _use_hub(monkeypatch, paper_weights)   # as if `dreamflow models fetch` had run meanwhile
    assert make_client(srv.endpoint).capabilities["preset_details"]["paper"] == {"runnable": True}


def test_a_partly_downloaded_model_names_only_that_model(monkeypatch, tmp_path, paper_weights):
    import shutil

    home = tmp_path / "hf-home"
    shutil.copytree(paper_weights, home, symlinks=True)
    refiner = PAPER_MODELS[2]
    for unet in (home / "hub" / f"models--{refiner.replace('/', '--')}" / "snapshots").glob("*/unet"):
        shutil.rmtree(unet)
    _use_hub(monkeypatch, home)
    paper = presets.preset_detail("paper", "cuda")
    assert paper["runnable"] is False
    assert paper["reason"] == f"weights not on this server: {refiner} (refiner)"


def test_a_ray_front_door_judges_by_its_jobs_gpu_share_not_its_own_device_or_disk(monkeypatch, tmp_path):
    _use_hub(monkeypatch, tmp_path / "empty-hf-home")   # the weights are on the nodes, not here
    gpu_jobs = {"runner": "ray", "job_resources": {"GPU": 1.0, "CPU": 4, "memory_gb": 16}}
    cpu_jobs = {"runner": "ray", "job_resources": {"GPU": 0.0, "CPU": 4, "memory_gb": 16}}
    assert presets.serving_device(gpu_jobs) == "cuda" and presets.serving_device(cpu_jobs) == "cpu"
    assert presets.preset_details(runner_facts=gpu_jobs)["paper"] == {"runnable": True}
    paper = presets.preset_details(runner_facts=cpu_jobs)["paper"]
    assert paper["runnable"] is False and paper["reason"].startswith("this server has no CUDA device")
    assert "weights" not in paper["reason"]
    # In process, the weights on this machine count.
    assert "weights not on this server" in presets.preset_details("cuda", {"runner": "in-process", "slots": 1})["paper"]["reason"]
