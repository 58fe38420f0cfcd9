"""Smoke test of bench/distill_2d.py on a small mixture and a tiny budget: rows, schema, tuning."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill_2d.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("distill_2d", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_tunes_and_writes_json(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--dim", "4", "--modes", "4", "--particles", "6", "--budgets", "8", "--grid", "0.5,1",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[unconditional]" in text and "[guided]" in text and "vsd-linear/learned" in text
    result = json.loads(out.read_text())
    setting = result["setting"]
    assert setting["kernel"] == 0.005 and setting["tuning_seed"] != setting["seed"] and setting["grid"] == [0.5, 1.0]
    rows = result["rows"]
    labels = [v[0] for v in bench.VARIANTS]
    assert len(rows) == 2 * (1 + len(labels))
    assert {r["method"] for r in rows} == {"exact", *labels}
    for r in rows:
        for key in ("method", "steps", "step_size", "modes_covered", "mode_balance", "spread_ratio", "mmd"):
            assert key in r
        assert 0 <= r["modes_covered"] <= r["modes"] and 0.0 <= r["mode_balance"] <= 1.0 and r["spread_ratio"] >= 0
        if r["method"] == "exact":
            assert r["step_size"] is None and r["spread_ratio"] > 0.5
            continue
        assert r["steps"] == 8 and [t["step_size"] for t in r["tuning"]] == [0.5, 1.0]
        # The reported step size is the tuning seed's best: most modes, then spread nearest 1.
        assert r["step_size"] == min(r["tuning"], key=bench.tuning_rank)["step_size"]
        best = max(t["modes_covered"] for t in r["tuning"])
        assert min(r["tuning"], key=bench.tuning_rank)["modes_covered"] == best
    guided = [r for r in rows if r["scenario"] == "guided"]
    assert all(r["modes"] == 2 for r in guided)
    assert {r["guidance"] for r in guided if r["method"] == "sds"} == {100.0}
    # Over several seeds: mean and spread; a seed's scenarios may come from separate runs.
    other = tmp_path / "seed1-guided.json"
    assert bench.main(["--dim", "4", "--modes", "4", "--particles", "6", "--budgets", "8", "--grid", "1",
                       "--methods", "apfo", "--scenarios", "guided", "--seed", "1", "--json", str(other)]) == 0
    capsys.readouterr()
    assert bench.main(["--aggregate", str(out), str(other)]) == 0
    text = capsys.readouterr().out
    assert "mean ± std over 2 seeds" in text and text.count("[guided]") == 1


def test_a_step_size_that_diverges_loses_the_tuning_and_an_edge_optimum_is_flagged(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    # 1e6 times the way to the target: the loop's rollbacks cannot save it, so it must not win.
    assert bench.main(["--dim", "4", "--modes", "4", "--particles", "6", "--budgets", "8", "--grid", "1,1e6",
                       "--methods", "sds", "--scenarios", "unconditional", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    row = [r for r in json.loads(out.read_text())["rows"] if r["method"] == "sds"][0]
    assert [t.get("diverged", False) for t in row["tuning"]] == [False, True]
    assert row["step_size"] == 1.0 and row["eta_at_grid_edge"]
    assert "1*" in text and "widen --grid" in text


def test_a_tuned_step_that_diverges_on_the_evaluation_seed_falls_back_to_the_next_best_visibly(tmp_path, capsys,
                                                                                                monkeypatch):
    bench = load_bench()
    real = bench.optimise_particles
    seen = []

    def diverging_on_the_evaluation_seed(cfg, prior):
        seen.append((cfg.seed, cfg.step_size))
        if cfg.seed == 0 and cfg.steps == 8 and cfg.step_size == best_on_tuning[0]:
            raise bench.NumericalDivergence("diverged")
        return real(cfg, prior)

    # First find which step the tuning seed prefers, then make exactly that one diverge at evaluation.
    out = tmp_path / "a.json"
    args = ["--dim", "4", "--modes", "4", "--particles", "6", "--budgets", "8", "--grid", "0.5,1",
            "--methods", "apfo", "--scenarios", "unconditional", "--json", str(out)]
    assert bench.main(args) == 0
    best_on_tuning = [[r for r in json.loads(out.read_text())["rows"] if r["method"] == "apfo"][0]["step_size"]]
    monkeypatch.setattr(bench, "optimise_particles", diverging_on_the_evaluation_seed)
    capsys.readouterr()
    assert bench.main(args) == 0
    row = [r for r in json.loads(out.read_text())["rows"] if r["method"] == "apfo"][0]
    assert row["eval_diverged_step_sizes"] == best_on_tuning and row["step_size"] != best_on_tuning[0]
    assert "!" in capsys.readouterr().out
