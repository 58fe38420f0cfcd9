"""The per-iteration benchmark runs every stage on CPU with the tiny architecture and reports a
sane table (no timing thresholds: the figures depend on the machine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.iteration import PAPER_ITERATIONS, PARTS, BenchSettings, _check_arch, format_table, main, run_bench
from dreamflow.pipeline.config import build_config

STAGE_CONFIG = {"1": "stage1", "2a": "geometry", "2b": "texture", "3": "refine"}


def lora(stage: str) -> dict[str, str] | None:
    """The smoke preset distils against the exact score model; the bench's tables are about the
    LoRA D_phi of the paper preset, so these runs ask the stage for it (2a keeps D_phi = x)."""
    return None if stage == "2a" else {f"{STAGE_CONFIG[stage]}.method.score_model": "lora"}


@pytest.fixture(scope="module")
def results(bench_workdir):
    """One short run of each stage at the smoke preset (the smallest settings of every path)."""
    return {stage: run_bench(BenchSettings(stage=stage, arch="tiny", device="cpu", preset="smoke", iters=1,
                                           warmup=0, workdir=str(bench_workdir), overrides=lora(stage)))
            for stage in ("1", "2a", "2b", "3")}


@pytest.mark.parametrize("stage", ["1", "2a", "2b", "3"])
def test_table_is_sane(results, stage):
    r = results[stage]
    it = r["iteration_ms"]
    assert r["iterations_timed"] == 1 and r["warmup"] == 0
    assert 0 < it["min"] <= it["p10"] <= it["median"] <= it["p90"] <= it["max"]
    assert r["iteration_cpu_ms"]["median"] > 0
    # The parts are disjoint intervals of each iteration: they never add up to more than it.
    parts = r["breakdown_ms"]
    assert set(parts) == set(PARTS) | {"other"}
    assert all(v >= 0 for k, v in parts.items() if k != "other")
    # The breakdown comes from the run timed per part; the headline from the plain run after it.
    timed = r["instrumented_ms"]
    assert 0 < timed["min"] <= timed["median"] <= timed["max"]
    assert parts["other"] >= -1e-6 * r["instrumented_mean_ms"]
    assert math.isclose(sum(parts.values()), r["instrumented_mean_ms"], rel_tol=1e-9)
    for busy in ("render_fwd", "vae_encode_fwd", "prior_unet", "vae_encode_bwd", "render_bwd", "optimiser"):
        assert parts[busy] > 0, busy
    # The floor: the guided prior pass always; D_phi's pass and its update when D_phi is trained.
    trained = stage != "2a"
    assert set(r["floor_ms"]) == {"prior_unet", "vae_encode_fwd_bwd"} | ({"lora_fwd", "lora_update"} if trained else set())
    assert (parts["lora_update"] > 0) == trained
    if trained:
        assert parts["lora_fwd"] > 0
    assert all(v > 0 for v in r["floor_ms"].values())
    assert r["unet_floor_ms"] == pytest.approx(sum(v for k, v in r["floor_ms"].items() if k != "vae_encode_fwd_bwd"))
    # No threshold on the ratio itself: on a shared CPU single timings scatter by several times.
    assert r["ratio_to_floor"] == pytest.approx(it["median"] / r["unet_floor_ms"])
    assert 0 < r["ratio_to_floor_with_vae"] <= r["ratio_to_floor"] < math.inf
    assert r["paper_iterations"] == PAPER_ITERATIONS[stage]
    assert r["projected_paper_s"] == pytest.approx(it["median"] * PAPER_ITERATIONS[stage] / 1e3)
    stage_cfg = getattr(build_config("smoke"), STAGE_CONFIG[stage])
    assert r["preset_iterations"] == stage_cfg.steps
    assert r["settings"]["resolution"] == stage_cfg.resolution
    assert r["settings"]["cfg_batch"] == 2 * stage_cfg.views_per_iteration
    assert r["peak_gpu_gb"] is None and r["memory_fallbacks"] == []
    assert r["numerics"] == {"rollbacks": 0, "nonfinite_steps": 0}
    table = format_table(r)
    assert f"projected stage time (paper, {PAPER_ITERATIONS[stage]} it)" in table
    assert "iteration / UNet floor" in table


@pytest.mark.parametrize("stage", ["1", "3"])
def test_bfloat16_stage_runs_clean(bench_workdir, stage):
    """The GPU's default precision through a whole stage iteration (render, encode, guided prior,
    D_phi and its update, 3D backward), here on CPU: finite losses and gradients, nothing undone."""
    r = run_bench(BenchSettings(stage=stage, arch="tiny", device="cpu", preset="smoke", iters=2, warmup=0,
                                dtype="bfloat16", workdir=str(bench_workdir), overrides=lora(stage)))
    assert r["settings"]["dtype"] == "bfloat16"
    assert r["numerics"] == {"rollbacks": 0, "nonfinite_steps": 0}
    assert "numerics (all iterations): 0 NaN rollbacks, 0 non-finite steps" in format_table(r)


def test_numerics_count_what_the_loop_undid(bench_workdir, monkeypatch):
    """A render that goes NaN once is counted as a non-finite step and a rollback (the loop then
    redoes the step), so a clean report means the run really was clean."""
    import bench.iteration as iteration

    real_build = iteration.build_stage

    def build_with_one_bad_render(settings):
        built = real_build(settings)
        problem, calls = built.loop.problem, {"n": 0}
        render = problem.render

        def flaky(cameras):
            calls["n"] += 1
            out = render(cameras)
            if calls["n"] == 2:
                out.image = out.image * float("nan")
            return out

        problem.render = flaky
        return built

    monkeypatch.setattr(iteration, "build_stage", build_with_one_bad_render)
    r = run_bench(BenchSettings(stage="2b", arch="tiny", device="cpu", preset="smoke", iters=2, warmup=0,
                                workdir=str(bench_workdir)))
    assert r["numerics"] == {"rollbacks": 1, "nonfinite_steps": 1}
    assert "1 NaN rollbacks, 1 non-finite steps" in format_table(r)


def test_a_plan_too_short_for_the_run_is_refused_up_front(bench_workdir):
    with pytest.raises(SystemExit, match="need 41"):
        run_bench(BenchSettings(stage="2a", arch="tiny", device="cpu", preset="smoke", iters=20, warmup=1,
                                workdir=str(bench_workdir)))


def test_all_stages_print_the_projected_pipeline(results, monkeypatch, capsys, tmp_path):
    """--stage all runs every stage with its own real architecture and sums the projections."""
    import bench.iteration as iteration

    seen = []
    monkeypatch.setattr(iteration, "run_bench", lambda s, log=None: seen.append(s) or results[s.stage])
    assert main(["--stage", "all", "--arch", "sd21", "--iters", "5", "--json", str(tmp_path / "all.json")]) == 0
    assert [(s.stage, s.arch, s.iters) for s in seen] == [("1", "sd21", 5), ("2a", "sd21", 5), ("2b", "sd21", 5),
                                                          ("3", "sdxl-refiner", 5)]
    out = capsys.readouterr().out
    total = sum(results[stage]["projected_paper_s"] for stage in ("1", "2a", "2b", "3"))
    assert out.strip().splitlines()[-1].startswith("projected full pipeline")
    assert out.strip().endswith(iteration._hms(total))
    assert out.count("iteration / UNet floor") == 4
    assert [d["bench_settings"]["stage"] for d in json.loads((tmp_path / "all.json").read_text())] == ["1", "2a", "2b", "3"]
    assert {s.arch for s in iteration.stage_settings(BenchSettings(stage="all", arch="tiny"))} == {"tiny"}


def test_stage_settings_follow_the_preset(results):
    assert results["1"]["settings"]["samples_per_ray"] == build_config("smoke").stage1.samples_per_ray
    assert results["2a"]["settings"]["score_model"] == "IdentityScoreModel"
    assert results["3"]["settings"]["unet_params_m"] > 0


def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch, results):
    """The command line parses into the settings run_bench gets, prints the table, writes the JSON
    (run_bench itself is exercised by the fixture above; here it hands back the 2a result)."""
    import bench.iteration as iteration

    seen = []
    monkeypatch.setattr(iteration, "run_bench", lambda s, log=None: seen.append(s) or results["2a"])
    out = tmp_path / "r.json"
    assert main(["--stage", "2a", "--arch", "tiny", "--preset", "smoke", "--iters", "7", "--warmup", "2",
                 "--set", "geometry.resolution=48", "--no-fast", "--json", str(out)]) == 0
    s = seen[0]
    assert (s.stage, s.arch, s.iters, s.warmup, s.preset, s.fast) == ("2a", "tiny", 7, 2, "smoke", False)
    assert s.overrides == {"geometry.resolution": "48"}
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(results["2a"]).strip()
    assert "stage 2a geometry" in printed and "projected stage time (paper, 5000 it)" in printed
    data = json.loads(out.read_text())
    assert data["bench_settings"]["stage"] == "2a" and data["iterations_timed"] == 1


def test_overrides_reach_the_stage(bench_workdir):
    r = run_bench(BenchSettings(stage="2a", arch="tiny", preset="smoke", iters=1, warmup=0, workdir=str(bench_workdir),
                                overrides={"geometry.resolution": "24"}))
    assert r["settings"]["resolution"] == 24 and r["settings"]["latent"] == "3x3"


@pytest.mark.parametrize("stage,arch,ok", [("3", "sd21", False), ("1", "sdxl-refiner", False), ("2b", "sd21", True),
                                           ("3", "sdxl-refiner", True), ("1", "tiny", True)])
def test_stage_and_architecture_must_match(stage, arch, ok):
    if ok:
        _check_arch(stage, arch)
    else:
        with pytest.raises(SystemExit, match="use --arch"):
            _check_arch(stage, arch)


def test_the_bench_times_the_stage_objects_a_job_runs(bench_workdir, monkeypatch):
    """The bench builds each stage through the very object run_job steps (pipeline/job.py STAGES),
    and what it gets is what that object builds for a job of the same settings: the same problem
    class, loop settings, timestep plan, method, camera ranges and D_phi kind."""
    import dreamflow.pipeline.job as job
    from bench.iteration import build_stage, pipeline_stage, sphere_input
    from dreamflow.events import JobControl, NullSink
    from dreamflow.pipeline.context import JobContext
    from dreamflow.pipeline.stage_loop import StageModels

    for stage in ("1", "2a", "2b", "3"):
        settings = BenchSettings(stage=stage, arch="tiny", device="cpu", preset="smoke", iters=1, warmup=0,
                                 workdir=str(bench_workdir))
        obj = pipeline_stage(stage)
        assert any(obj is s for s in job.STAGES)
        calls = []
        real_build = type(obj).build
        monkeypatch.setattr(type(obj), "build", lambda self, *a, **k: calls.append(self) or real_build(self, *a, **k))
        bench = build_stage(settings)
        monkeypatch.undo()
        assert calls == [obj], stage  # the job's own object built the bench's run
        # The same object, given the context of a job of the same preset, builds the same run.
        ctx = JobContext(build_config(settings.preset, settings.overrides), bench_workdir, NullSink(), JobControl(),
                         torch.device("cpu"))
        incoming = None if stage == "1" else sphere_input(ctx.config, ctx.device)
        run = obj.build(ctx, incoming, StageModels(bench.loop.prior))
        a, b = bench.loop, run.loop
        assert type(a.problem) is type(b.problem) and type(a.method) is type(b.method), stage
        assert a.config == b.config, stage
        assert (a.method.name, a.method.schedule, type(a.method.rule)) == (b.method.name, b.method.schedule, type(b.method.rule))
        assert [p.t for p in a.plan] == [p.t for p in b.plan], stage
        assert a.cameras.ranges == b.cameras.ranges, stage
        assert type(a.score_model) is type(b.score_model) and bench.run.score_name == run.score_name, stage
        stage_cfg = getattr(ctx.config, obj.config_attr)
        assert a.config.iterations == stage_cfg.steps and a.config.views_per_iteration == stage_cfg.views_per_iteration, stage
