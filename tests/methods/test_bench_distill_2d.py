"""Smoke test of bench/distill_2d.py on a small mixture and short budgets."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill_2d.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("distill_2d", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_writes_json(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--dim", "4", "--modes", "4", "--particles", "6", "--budgets", "20,40", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[unconditional]" in text and "[guided]" in text and "apfo(l=1)" in text
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 5 * 2
    assert {r["method"] for r in rows} == {"apfo", "apfo(l=1)", "vsd", "sds", "fsd"}
    for r in rows:
        assert 0.0 <= r["fraction_near_mode"] <= 1.0 and 0 <= r["modes_covered"] <= r["modes"]
    guided = [r for r in rows if r["scenario"] == "guided"]
    assert all(r["modes"] == 2 for r in guided)
    assert {r["guidance"] for r in guided if r["method"] == "sds"} == {100.0}
    # Exact APFO reaches the prompted modes within a few dozen steps.
    apfo = [r for r in rows if r["method"] == "apfo" and r["steps"] == 40]
    assert all(r["fraction_near_mode"] == 1.0 for r in apfo)
