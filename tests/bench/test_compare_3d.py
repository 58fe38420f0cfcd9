"""bench/compare_3d.py runs the job per method and budget, scores every asset, writes the table,
the plot and the JSON (tiny random prior, smoke settings: no quality or timing is asserted), and
answers the claim from the numbers it is given."""

from __future__ import annotations

import json

from bench.compare_3d import claim, main, summarise


def test_compare_3d_runs_scores_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--preset", "smoke", "--set", "prior.kind=tiny", "--methods", "apfo,vsd", "--budgets", "2",
               "--prompts", "a red cube", "--views", "4", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "R-prec" in text and "VSD at 2 steps" in text
    result = json.loads((tmp_path / "r.json").read_text())
    assert [(r["method"], r["steps"]) for r in result["rows"]] == [("apfo", 2), ("vsd", 2)]
    for row in result["rows"]:
        assert 0.0 <= row["r_precision"] <= 1.0 and row["chamfer_rel"] > 0 and row["seconds"] > 0
        assert 0.0 <= row["silhouette_iou"] <= 1.0 and row["colour_error"] >= 0
    assert result["setting"]["stages"] == ["stage1"]
    report = json.loads((out / "apfo" / "00002" / "a_red_cube" / "report.json").read_text())
    assert report["stages"]["stage1"]["steps"] == 2 and "geometry" not in report["stages"]
    assert (out / "quality_vs_steps.png").stat().st_size > 0


def test_the_claim_reads_the_fewest_apfo_steps_that_match_vsd():
    def row(method, steps, r, chamfer):
        return {"method": method, "steps": steps, "prompt": "p", "seconds": 1.0, "r_precision": r,
                "chamfer_rel": chamfer, "silhouette_iou": 0.5, "colour_error": 10.0}

    rows = [row("apfo", 40, 0.5, 0.05), row("apfo", 80, 0.9, 0.02), row("apfo", 400, 1.0, 0.01),
            row("vsd", 200, 0.8, 0.03), row("vsd", 400, 0.95, 0.015)]
    answers = {c["vsd_steps"]: c for c in claim(summarise(rows))}
    assert answers[200]["apfo_steps_to_match"] == 80 and not answers[200]["within_a_fifth"]
    assert answers[400]["apfo_steps_to_match"] == 400 and not answers[400]["within_a_fifth"]
    rows[1] = row("apfo", 40, 0.9, 0.02)
    rows[0] = row("apfo", 20, 0.5, 0.05)
    answers = {c["vsd_steps"]: c for c in claim(summarise(rows))}
    assert answers[200]["apfo_steps_to_match"] == 40 and answers[200]["within_a_fifth"]
