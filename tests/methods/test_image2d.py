"""2D mode end to end: every method on the tiny random SD and on the Gaussian mixture, and the CLI."""

import json

import pytest

from dreamflow.cli import main
from dreamflow.events import RecordingSink
from dreamflow.methods.registry import METHOD_NAMES
from dreamflow.pipeline.image2d import Image2DConfig, run_image2d
from dreamflow.priors.stable_diffusion import StableDiffusionPrior
from dreamflow.priors.tiny import tiny_stable_diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-2d"), "v_prediction")
    return folder, StableDiffusionPrior.from_pretrained(str(folder), local_files_only=True, view_dependent=False)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_runs_on_tiny_stable_diffusion(method, tiny_sd, tmp_path):
    folder, prior = tiny_sd
    cfg = Image2DConfig(prompt="a red chair", prior="sd", method=method, steps=3, particles=2, model=str(folder),
                        resolution=32, local_files_only=True)
    sink = RecordingSink()
    report = run_image2d(cfg, tmp_path, sink=sink, prior=prior)
    assert report["steps"] == 3
    assert [e[1]["step"] for e in sink.of_kind("progress")] == [1, 2, 3]
    history = report["history"]
    assert all(h["loss"] > 0 and h["grad_norm"] > 0 for h in history)
    assert (history[0]["score_loss"] > 0) == (method in ("apfo", "vsd"))  # LoRA trained only there
    assert (tmp_path / "particles.png").is_file() and (tmp_path / "loss.png").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["method"]["name"] == method


def test_gmm_run_reports_exact_metrics(tmp_path):
    report = run_image2d(Image2DConfig(method="apfo", steps=60, particles=6, gmm_size=6, gmm_modes=3), tmp_path)
    m = report["metrics"]
    assert m["modes"] == 3 and 0 <= m["fraction_near_mode"] <= 1 and len(m["nearest_mode"]) == 6
    assert m["fraction_near_mode"] == 1.0  # 60 APFO steps reach the modes
    assert 0 < m["spread_ratio"] and 0 <= m["mode_balance"] <= 1 and "mmd" in m
    assert report["timesteps"] == 60  # 2D: one update per timestep


def test_cli_image_command(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["image", "mode1", "--prior", "gmm", "--method", "sds", "--steps", "20", "--particles", "3",
                 "--size", "6", "--modes", "3", "--out", str(out)]) == 0
    assert "sds: 20 steps" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prompt"] == "mode1" and report["method"]["guidance"] == 100.0
    assert main(["image", "a cat", "--prior", "gmm", "--steps", "2", "--out", str(out)]) == 1
    assert "mode0" in capsys.readouterr().err
