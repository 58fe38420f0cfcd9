"""bench/gpu_check.py: the whole GPU check runs every step on the CPU at tiny sizes (--dry-run) and
writes every step's figures; the wheels it gathers for a GPU machine are resolved right (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamflow.toyworld.world import ALL_PROMPTS, ORIENTED_PROMPTS, PROMPTS
from bench import gpu_check
from bench.gpu_check import (STAGES, STEP_ORDER, VARIANTS, Check, download_command, format_markdown,
                             missing_packages, plan_wheels, projection, resolve_command, run_check, run_process)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the real command line, into a fresh output folder."""
    base = tmp_path_factory.mktemp("gpu-check")
    out, work = base / "out", base / "work"
    # A large budget: the steps' shares scale with it, so a loaded CI machine cuts nothing short.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--work", str(work), "--budget", "5000"], capture_output=True, text=True)
    return proc, out, work


@pytest.mark.slow
def test_dry_run_executes_every_step_and_writes_its_figures(dry_run):
    proc, out, work = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert list(steps) == list(STEP_ORDER)
    assert {k: v["status"] for k, v in steps.items()} == {**{k: "ok" for k in STEP_ORDER}, "compile": "skipped"}
    assert data["environment"]["missing"] == [] and data["dry_run"] is True

    # The models: D_p, D_phi's v-prediction twin (linked weights, its own scheduler), the refiner.
    phi = Path(data["models"]["phi"])
    assert (phi / "unet").is_symlink()
    assert json.loads((phi / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"

    # The paper preset's job ran every stage from those folders and wrote its asset.
    job = steps["generate-paper"]
    assert job["returncode"] == 0 and set(job["stages"]) == {"stage1", "geometry", "texture", "refine"}
    assert all(s > 0 for s in job["stages"].values()) and job["mesh"]["faces"] > 0
    paper_report = json.loads((work / "generate-paper" / "report.json").read_text())
    assert paper_report["config"]["prior"]["phi_model"] == str(phi)

    # Every stage timed with the fast path; the switches one at a time on the dry run's stage.
    timings = {(r["stage"], r["variant"]): r for r in data["timings"]}
    expected = {(s, "fast path") for s in STAGES} | {(s, v) for s in gpu_check.DRY_RUN_SWITCH_STAGES for v in VARIANTS}
    assert set(timings) == expected
    for r in timings.values():
        assert r["status"] == "ok" and r["ms_per_it"]["median"] > 0 and r["unet_floor_ms"] > 0
        assert r["ratio_to_floor"] == pytest.approx(r["ms_per_it"]["median"] / r["unet_floor_ms"])
        assert r["projected_paper_s"] == pytest.approx(r["ms_per_it"]["median"] * r["paper_iterations"] / 1e3)
        assert r["numerics"] == {"rollbacks": 0, "nonfinite_steps": 0}
    # Each variant turned its switch off, and only that one (the dry run's base mirrors CUDA's defaults).
    stage = gpu_check.DRY_RUN_SWITCH_STAGES[0]
    assert timings[(stage, "fast path")]["dtype"] == "bfloat16"
    assert timings[(stage, "float32 (no bf16)")]["dtype"] == "float32"
    assert "sdpa-unet" in timings[(stage, "fast path")]["fast_path"]
    assert "unfused-attention-unet" in timings[(stage, "unfused attention (no SDPA)")]["fast_path"]
    assert "channels-last-unet" in timings[(stage, "fast path")]["fast_path"]
    assert "channels-last-unet" not in timings[(stage, "no channels-last")]["fast_path"]
    total = projection(data["timings"])["total_s"]
    assert total == pytest.approx(sum(timings[(s, "fast path")]["projected_paper_s"] for s in STAGES))

    toy = steps["toy-job"]
    assert toy["returncode"] == 0 and set(toy["stages"]) == {"stage1", "geometry", "texture", "refine"}
    train = steps["toy-train"]
    one_each = len(PROMPTS) + len(ORIENTED_PROMPTS) + len(ALL_PROMPTS)  # one view, oriented view, normal map each
    assert train["model_written"] and train["images"] == one_each and train["train_seconds"] > 0
    assert train["render_seconds"] >= 0

    # The markdown has each table with its figures, and nothing left pending.
    md = (out / "gpu_check.md").read_text()
    assert md == format_markdown(data)
    assert "pending" not in md
    for stage in STAGES:
        r = timings[(stage, "fast path")]
        assert f"| {stage} | tiny, bfloat16 | {r['ms_per_it']['median']:.1f} | {r['unet_floor_ms']:.1f} |" in md
    assert f"**{gpu_check._duration(total)}**" in md
    for name in ("stage1", "geometry", "texture", "refine"):
        assert f"| {name} | {job['stages'][name]:.1f} |" in md and f"| {name} | {toy['stages'][name]:.1f} |" in md
    assert f"| {one_each} | {train['render_seconds']:.1f} | 1 | 1 (4) | {train['train_seconds']:.1f} | ok |" in md
    log = (out / "gpu_check.log").read_text()
    assert all(f"{name}: ok" in log for name in STEP_ORDER if name != "compile")


def test_a_missing_package_stops_the_check_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "missing_packages", lambda reqs: ["diffusers", "pyzmq"])
    check = Check(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=60, compile=False)
    assert run_check(check) == 2
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    step = data["steps"]["requirements"]
    assert step["status"] == "failed" and "diffusers, pyzmq" in step["error"] and "--wheels" in step["error"]
    assert data["steps"]["models"]["status"] == "pending"
    assert "| requirements | failed |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_missing_packages_looks_modules_up_by_their_import_names():
    assert missing_packages(["numpy>=1.24", "pyzmq>=25", "Pillow>=10", "PyMCubes>=0.1.4"]) == []
    assert missing_packages(["surely-not-a-module-here>=1", "numpy"]) == ["surely-not-a-module-here"]


def test_project_requirements_leave_torch_out():
    reqs = gpu_check.project_requirements()
    assert any(r.startswith("diffusers") for r in reqs) and not any(r.startswith("torch") for r in reqs)


def _report(*items):
    return {"install": [{"metadata": {"name": n, "version": v},
                         "download_info": {"url": f"https://files.example/{n}-{v}{ext}"}} for n, v, ext in items]}


def test_wheel_plan_keeps_what_the_gpu_machine_lacks_and_never_torch():
    report = _report(("diffusers", "0.42.1", "-py3-none-any.whl"), ("torch", "2.7.1", "-cp312-cp312-manylinux_2_28_x86_64.whl"),
                     ("nvidia-cublas-cu12", "12.6", "-py3-none-manylinux2014_x86_64.whl"), ("triton", "3.3.1", ".whl"),
                     ("Huggingface_Hub", "1.33.0", "-py3-none-any.whl"), ("pyzmq", "27.3.0", "-cp312-abi3-manylinux_2_28_x86_64.whl"),
                     ("PyMCubes", "0.1.6", "-cp312-cp312-manylinux2014_x86_64.whl"))
    plan = plan_wheels(report)
    assert [(w["name"], w["version"]) for w in plan] == [("diffusers", "0.42.1"), ("PyMCubes", "0.1.6"), ("pyzmq", "27.3.0")]
    assert plan[0]["file"] == "diffusers-0.42.1-py3-none-any.whl"
    assert plan_wheels(report, present=["diffusers", "pymcubes", "pyzmq", "huggingface-hub"]) == []


def test_wheel_plan_refuses_a_source_archive():
    with pytest.raises(RuntimeError, match="xatlas 0.0.11 resolved to a source archive"):
        plan_wheels(_report(("xatlas", "0.0.11", ".tar.gz")))


def test_pip_commands_target_the_gpu_machines_python(tmp_path):
    wheels = [{"name": "diffusers", "version": "0.42.1"}, {"name": "pyzmq", "version": "27.3.0"}]
    download = download_command(wheels, tmp_path)
    assert download[download.index("download") + 1] == "--no-deps" and download[-2:] == ["diffusers==0.42.1", "pyzmq==27.3.0"]
    resolve = resolve_command(["diffusers>=0.30"], tmp_path / "r.json", tmp_path / "c.txt", tmp_path / "t")
    for args in (download, resolve):
        assert args[args.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in args
        assert "manylinux2014_x86_64" in args and "manylinux_2_28_x86_64" in args
    assert {"--dry-run", "--report", "-c"} <= set(resolve) and resolve[-1] == "diffusers>=0.30"


def test_a_step_past_its_deadline_is_stopped_and_keeps_its_output(tmp_path):
    check = Check(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=60, compile=False)
    run = run_process(check, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"],
                      time.monotonic() + 3, "sleeper")
    assert run["timed_out"] and run["tail"] == ["started"] and gpu_check.process_status(run) == "timeout"
    assert "sleeper | started" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_bench_child_that_dies_is_restarted_after_the_item_it_died_on(tmp_path, monkeypatch):
    """A CUDA error can kill the process running the bench items: that item is recorded as crashed
    and a new process runs the rest; what the dead one finished is kept."""
    check = Check(tmp_path / "out", tmp_path / "work", dry_run=True, budget_s=60, compile=False)
    items = gpu_check.timing_items(["fast path"], ["1", "2a", "2b"])
    calls = []

    def fake_run(check_, command, deadline, label, on_poll=None):
        spec = json.loads(command[command.index("--spec") + 1])
        calls.append([i["stage"] for i in spec["items"]])
        first = spec["items"][0]
        with open(spec["results"], "a") as f:
            f.write(json.dumps({**first, "status": "ok", "arch": "tiny", "dtype": "bfloat16", "ms_per_it": {"median": 2.0},
                                "unet_floor_ms": 1.0, "ratio_to_floor": 2.0, "ratio_to_floor_with_vae": 1.5,
                                "peak_gpu_gb": None, "paper_iterations": 10, "projected_paper_s": 0.02}) + "\n")
            on_poll()
            f.write('{"stage": "2a", "variant": "fast pa')  # the next record, cut off by the crash
            f.flush()
            on_poll()
        crashed = len(calls) == 1
        return {"returncode": -11 if crashed else 0, "seconds": 1.0, "timed_out": False, "tail": ["Segmentation fault"]}

    monkeypatch.setattr(gpu_check, "run_process", fake_run)
    result = gpu_check._timing_step(check, time.monotonic() + 60, items, "timing")
    assert calls == [["1", "2a", "2b"], ["2b"]]
    assert [(r["stage"], r["status"]) for r in check.data["timings"]] == [("1", "ok"), ("2a", "crashed"), ("2b", "ok")]
    assert result["status"] == "partial" and result["items_done"] == 2 and result["not_run"] == []
    assert "| 2a | - | crashed |" in format_markdown(check.data)  # the table says so, and the pipeline has no total
    assert "**-**" in format_markdown(check.data)


def test_only_what_the_gpu_image_lacks_is_resolved():
    """peft and transformers are on the GPU image: resolving them would fetch torch's metadata (gigabytes
    where the index has no separate metadata) for a package that is never carried."""
    wanted = gpu_check.requirements_to_resolve(gpu_check.project_requirements())
    names = {gpu_check.normalise(gpu_check._requirement_name(r)) for r in wanted}
    assert names == {"diffusers", "pyzmq", "trimesh", "xatlas", "pymcubes", "fast-simplification"}
