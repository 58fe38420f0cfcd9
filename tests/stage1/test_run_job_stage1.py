"""run_job end to end on the reference prior (smoke preset), its events, files, resume and bad inputs."""


import numpy as np
import pytest

from dreamflow.cli import main
from dreamflow.config import ConfigError
from dreamflow.events import Cancelled, JobControl, RecordingSink
from dreamflow.export.files import read_glb
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job

#: Stage 1 alone: the later stages have their own tests.
STAGE1_ONLY = {"geometry.enabled": False, "texture.enabled": False, "refine.enabled": False}


class CancelAt(RecordingSink):
    """Records events and cancels the job after a given stage-1 step."""

    def __init__(self, control: JobControl, step: int):
        super().__init__()
        self.control, self.step = control, step

    def emit(self, kind, fields, arrays=None):
        super().emit(kind, fields, arrays)
        if kind == "progress" and fields["step"] == self.step:
            self.control.cancel("test")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    sink = RecordingSink()
    result = run_job(build_config("smoke", STAGE1_ONLY), out, sink, JobControl(), checkpoint_dir=out / "ckpt")
    return out, sink, result


def test_events_follow_the_contract(smoke_run):
    out, sink, result = smoke_run
    cfg = build_config("smoke", STAGE1_ONLY).stage1
    progress = sink.of_kind("progress")
    assert [f["step"] for _, f, _ in progress] == list(range(1, cfg.steps + 1))
    for _, f, _ in progress:
        assert f["stage"] == "stage1" and f["total"] == cfg.steps and np.isfinite(f["loss"])
        assert {"t", "elapsed", "eta", "stage_index", "stage_count"} <= set(f)
    previews = sink.of_kind("preview")
    assert previews and all(a["image"].dtype == np.uint8 and a["image"].shape == (cfg.resolution, cfg.resolution, 3)
                            for _, _, a in previews)
    meshes = sink.of_kind("mesh")
    assert [f["final"] for _, f, _ in meshes][-1] is True
    done = sink.of_kind("stage_done")
    assert done[-1][1]["stage"] == "stage1" and done[-1][1]["seconds"] > 0


def test_files_and_report(smoke_run):
    out, sink, result = smoke_run
    for name in ("model.glb", "turntable.png", "loss.png", "report.json"):
        assert (out / name).is_file(), name
    assert set(result.files.values()) >= {"model.glb", "turntable.png", "loss.png", "report.json"}
    assert result.report["reference"] == {"file": "builtin", "colours_from": "texture"}
    q = result.report["quality"]
    assert np.isfinite(q["psnr_db"]) and np.isfinite(q["chamfer_rel"])
    assert result.report["stages"]["stage1"]["seconds"] > 0


def test_the_final_mesh_event_is_the_glb_on_disk(smoke_run):
    out, sink, result = smoke_run
    final = sink.of_kind("mesh")[-1][2]
    glb = read_glb(out / "model.glb")
    np.testing.assert_allclose(glb.vertices, final["vertices"], atol=1e-6)
    np.testing.assert_array_equal(glb.faces, final["faces"])
    np.testing.assert_allclose(glb.uvs, final["uvs"], atol=1e-6)
    np.testing.assert_array_equal(glb.texture, final["texture"])


def test_cancel_then_resume_from_the_checkpoint(tmp_path):
    cfg = build_config("smoke", {**STAGE1_ONLY, "stage1.mesh_every": 0, "stage1.preview_every": 0})
    control = JobControl()
    first = CancelAt(control, 3)
    with pytest.raises(Cancelled):
        run_job(cfg, tmp_path, first, control, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "stage1.pt").is_file()
    second = RecordingSink()
    run_job(cfg, tmp_path, second, JobControl(), checkpoint_dir=tmp_path / "ckpt")
    steps = [f["step"] for _, f, _ in second.of_kind("progress")]
    # checkpoint_every = 2 in the smoke preset: the run continues after step 2, not from the start.
    assert steps[0] == 3 and steps[-1] == cfg.stage1.steps


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config("nope")
    with pytest.raises(ConfigError, match="needs a prompt"):
        run_job(build_config("smoke", {**STAGE1_ONLY, "prior.kind": "tiny"}), tmp_path, RecordingSink(), JobControl())
    bad = tmp_path / "notes.txt"
    bad.write_text("not a mesh")
    assert main(["demo", "--out", str(tmp_path / "d"), "--preset", "smoke", "--reference", str(bad)]) == 2
    assert "not a mesh" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["generate", "  ", "--out", str(tmp_path / "g")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    # No weights on this machine: a missing model is a one-line error that says how to fix it.
    assert main(["generate", "a chair", "--out", str(tmp_path / "g"), "--preset", "smoke",
                 "--set", "prior.kind=stable-diffusion", "--set", "prior.model=/nonexistent/sd-folder",
                 "--set", "prior.local_files_only=true"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_reference_file_without_colour_is_named_in_the_log_events_and_the_report(tmp_path):
    import json

    import trimesh

    plain = tmp_path / "plain.ply"
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(plain)
    sink = RecordingSink()
    overrides = {**STAGE1_ONLY, "prior.reference": str(plain), "stage1.steps": 1}
    run_job(build_config("smoke", overrides), tmp_path / "out", sink, JobControl())
    warnings = [f["message"] for _, f, _ in sink.of_kind("log") if f["level"] == "warning"]
    assert any("plain.ply has no colour" in m and "grey" in m for m in warnings)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reference"] == {"file": str(plain), "colours_from": "none"}
