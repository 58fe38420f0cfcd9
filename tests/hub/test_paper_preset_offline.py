"""The paper preset by its default Hugging Face ids, offline, through every stage: the path users take first.

`dreamflow generate --preset paper` and `dreamflow serve` + `dreamflow submit` run as real
processes with ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` at the offline cache of tiny random models
stored under the real ids; only steps and resolutions are made tiny with ``--set``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from offline_hub import PAPER_MODELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from reliability_helpers import serve, stop  # noqa: E402

TINY = [
    "stage1.steps=2", "stage1.resolution=32", "stage1.samples_per_ray=16", "stage1.grid.log2_table_size=12",
    "stage1.grid.levels=4", "stage1.mesh_resolution=32", "stage1.mesh_every=2", "stage1.occupancy_resolution=16",
    "geometry.steps=2", "geometry.resolution=32", "geometry.tet_resolution=16", "geometry.mesh_every=2",
    "texture.steps=2", "texture.resolution=32", "texture.grid.log2_table_size=12", "texture.grid.levels=4",
    "texture.mesh_every=2", "refine.steps=2", "refine.resolution=32", "refine.grid.log2_table_size=12",
    "refine.grid.levels=4", "refine.mesh_every=2", "export.texture_size=64", "export.face_budget=2000",
    "export.view_resolution=32", "prior.encode_size=64",
]
SET_TINY = [arg for s in TINY for arg in ("--set", s)]


def _env(home: Path, offline: bool = True) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: any network use fails
    return env


def _dreamflow(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamflow", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _check_report(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["stage1", "geometry", "texture", "refine"]
    assert all(s["steps"] == 2 for s in report["stages"].values())
    prior = report["config"]["prior"]
    assert (prior["model"], prior["phi_model"], prior["refiner_model"]) == PAPER_MODELS
    assert (out / "model.glb").stat().st_size > 0


@pytest.mark.slow
def test_generate_with_the_paper_preset_runs_every_stage_from_the_offline_cache(offline_hub, tmp_path):
    out = tmp_path / "out"
    done = _dreamflow("generate", "a red chair", "--preset", "paper", "--out", str(out), *SET_TINY, env=_env(offline_hub))
    assert done.returncode == 0, done.stderr[-3000:]
    _check_report(out)


@pytest.mark.slow
def test_serve_and_submit_with_the_paper_preset_run_every_stage_from_the_offline_cache(offline_hub, tmp_path):
    env = _env(offline_hub)
    server, endpoint = serve(tmp_path / "store", env={"HF_HOME": env["HF_HOME"], "HF_HUB_OFFLINE": "1"})
    try:
        out = tmp_path / "out"
        done = _dreamflow("submit", "a red chair", "--preset", "paper", *SET_TINY, "--wait", "--out", str(out),
                          "--connect", endpoint, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        _check_report(out)
    finally:
        stop(server)


def test_a_model_missing_from_the_cache_fails_generate_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = _dreamflow("generate", "a red chair", "--preset", "paper", "--out", str(out), *SET_TINY,
                      env=_env(tmp_path / "empty-hf-home"))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert f"'{PAPER_MODELS[0]}'" in errors[0] and "dreamflow models fetch" in errors[0]
    assert not (tmp_path / "empty-hf-home").exists()  # nothing was written into a cache


def test_models_list_with_and_without_the_cache(offline_hub, tmp_path):
    listed = _dreamflow("models", "list", "--preset", "paper", env=_env(offline_hub))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith(("prior", "phi", "refiner"))]
    assert [(r[0], r[1], r[-3]) for r in rows] == [("prior", PAPER_MODELS[0], "ready"), ("phi", PAPER_MODELS[1], "ready"),
                                                   ("refiner", PAPER_MODELS[2], "ready")]
    assert all(r[-1] == "MB" for r in rows)  # the size on disk of the files the pipeline reads
    missing = _dreamflow("models", "list", "--preset", "paper", env=_env(tmp_path / "none"))
    assert missing.returncode == 1
    assert [line.split()[-2] for line in missing.stdout.splitlines()[1:4]] == ["missing"] * 3
    assert "not in the Hugging Face cache" in missing.stdout


def test_models_fetch_with_everything_present_needs_no_network(offline_hub):
    done = _dreamflow("models", "fetch", "--preset", "paper", env=_env(offline_hub, offline=False))
    assert done.returncode == 0, done.stderr
    assert "nothing to download" in done.stdout
