"""The paper's claim measured in 3D: APFO, VSD, SDS and FSD on the toy prior, over step budgets.

For each method, prompt and step budget it runs the job the CLI runs (``run_job``; by default
stage 1 only, the NeRF, where DreamFlow Table 2 compares APFO with VSD) with the stage's step
count set to the budget, then scores the final asset with the one evaluation
(dreamflow.toyworld.evaluate.score_asset): R-precision with the toy evaluator over the 36 toy
prompts, Chamfer distance, silhouette IoU and colour error against the true object; and the
job's wall time. It prints a table per method and budget (means over prompts), draws quality
against steps (``--out``, PNG) and answers DreamFlow's claim: does APFO reach the quality VSD
reaches, in at most a fifth of the steps?

    .venv/bin/python bench/compare_3d.py [--methods apfo,vsd,sds,fsd] [--budgets 30,60,150,300]
        [--prompts "a red cube;a blue torus"] [--stages stage1] [--preset toy] [--views 24]
        [--out bench-out/compare_3d] [--json OUT] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dreamflow.config import parse_cli_overrides
from dreamflow.events import JobControl, NullSink
from dreamflow.export.files import read_glb
from dreamflow.methods.registry import METHOD_NAMES
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import STAGES, run_job
from dreamflow.toyworld.evaluate import score_asset
from dreamflow.toyworld.scoring import load_scorer

#: Two prompts that differ in shape and colour; --prompts widens it.
PROMPTS = ("a red cube", "a blue torus")
#: Stage-1 step budgets: 30 -> 150 and 60 -> 300 are the claim's factor of five; 300 is the toy
#: preset's own stage-1 length.
BUDGETS = (30, 60, 150, 300)
#: Quality measures (key, label, higher is better).
MEASURES = (("r_precision", "R-precision", True), ("chamfer_rel", "Chamfer (rel.)", False),
            ("silhouette_iou", "silhouette IoU", True), ("colour_error", "colour error (dE76)", False))


def _stage_overrides(stages: Sequence[str], budget: int) -> dict[str, Any]:
    """Enable only ``stages``; each enabled stage gets ``budget`` steps."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        name, attr = stage.name, stage.config_attr
        on = name in stages or attr in stages
        out[f"{attr}.enabled"] = on
        if on:
            out[f"{attr}.steps"] = budget
    return out


def run(methods: Sequence[str] = METHOD_NAMES, prompts: Sequence[str] = PROMPTS, budgets: Sequence[int] = BUDGETS,
        stages: Sequence[str] = ("stage1",), preset: str = "toy", views: int = 24, seed: int = 0,
        overrides: dict[str, Any] | None = None, workdir: str | Path = "bench-out/compare_3d",
        evaluator: str | None = None, log=print) -> dict:
    """Every (method, prompt, budget) run, scored; a JSON-ready dict."""
    scorer = load_scorer(None, evaluator)
    workdir = Path(workdir)
    rows = []
    for method in methods:
        for budget in budgets:
            for prompt in prompts:
                over = {**_stage_overrides(stages, budget), **(overrides or {})}
                config = build_config(preset, over, prompt=prompt, seed=seed, method=method, device="cpu")
                out = workdir / method / f"{budget:05d}" / prompt.replace(" ", "_")
                start = time.perf_counter()
                cpu = time.process_time()
                result = run_job(config, out, NullSink(), JobControl())
                wall = time.perf_counter() - start
                cpu = time.process_time() - cpu
                mesh = read_glb(out / result.files["model"])
                scores = score_asset(mesh, prompt, scorer, views=views)
                row = {"method": method, "steps": budget, "prompt": prompt, "seconds": wall, "cpu_seconds": cpu,
                       **{k: scores.get(k) for k, _, _ in MEASURES}, "most_retrieved": scores["most_retrieved"]}
                rows.append(row)
                log(f"{method:4} {budget:5d} {prompt:24} R {row['r_precision']:.3f} chamfer {row['chamfer_rel']:.4f} "
                    f"IoU {row['silhouette_iou']:.3f} dE {row['colour_error']:.1f} {wall:.1f} s")
    return {"setting": {"methods": list(methods), "prompts": list(prompts), "budgets": list(budgets),
                        "stages": list(stages), "preset": preset, "views": views, "seed": seed,
                        "overrides": overrides or {}, "scorer": scorer.name, "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "rows": rows, "summary": summarise(rows), "claim": claim(summarise(rows))}


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Means over prompts per (method, steps)."""
    out = []
    keys = list(dict.fromkeys((r["method"], r["steps"]) for r in rows))
    for method, steps in keys:
        group = [r for r in rows if r["method"] == method and r["steps"] == steps]
        entry = {"method": method, "steps": steps, "prompts": len(group)}
        for k in [m for m, _, _ in MEASURES] + ["seconds"]:
            vals = [r[k] for r in group if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            entry[k] = float(np.mean(vals)) if vals else None
        out.append(entry)
    return out


def _at_least_as_good(a: dict, b: dict, key: str, higher: bool) -> bool:
    if a.get(key) is None or b.get(key) is None:
        return False
    return a[key] >= b[key] - 1e-9 if higher else a[key] <= b[key] + 1e-9


def claim(summary: Sequence[dict], fast: str = "apfo", slow: str = "vsd", factor: float = 5.0) -> list[dict]:
    """For each of VSD's budgets: the fewest APFO steps whose mean R-precision and Chamfer are at least
    as good as VSD's there, and whether that is at most a fifth of VSD's steps."""
    fast_rows = sorted((s for s in summary if s["method"] == fast), key=lambda s: s["steps"])
    answers = []
    for ref in sorted((s for s in summary if s["method"] == slow), key=lambda s: s["steps"]):
        match = next((s for s in fast_rows if _at_least_as_good(s, ref, "r_precision", True)
                      and _at_least_as_good(s, ref, "chamfer_rel", False)), None)
        answers.append({"vsd_steps": ref["steps"], "vsd_r_precision": ref["r_precision"], "vsd_chamfer": ref["chamfer_rel"],
                        "apfo_steps_to_match": None if match is None else match["steps"],
                        "within_a_fifth": None if match is None else bool(match["steps"] * factor <= ref["steps"])})
    return answers


def table(result: dict) -> str:
    """Means over prompts per method and budget, then the claim."""
    lines = [f"{'method':6} {'steps':>5} {'R-prec':>6} {'chamfer':>8} {'sil IoU':>7} {'dE76':>6} {'wall s':>7}"]
    for s in result["summary"]:
        def f(k: str, fmt: str) -> str:
            return format(s[k], fmt) if s.get(k) is not None else "-"
        lines.append(f"{s['method']:6} {s['steps']:5d} {f('r_precision', '.3f'):>6} {f('chamfer_rel', '.4f'):>8} "
                     f"{f('silhouette_iou', '.3f'):>7} {f('colour_error', '.1f'):>6} {f('seconds', '.1f'):>7}")
    for c in result["claim"]:
        got = ("no APFO budget matched it" if c["apfo_steps_to_match"] is None else
               f"APFO matched it at {c['apfo_steps_to_match']} steps "
               f"({'within' if c['within_a_fifth'] else 'not within'} a fifth)")
        lines.append(f"VSD at {c['vsd_steps']} steps (R-prec {c['vsd_r_precision']:.3f}, chamfer {c['vsd_chamfer']:.4f}): {got}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Quality against steps, one line per method, one panel per measure (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4 * len(MEASURES), 3.4), dpi=100)
    for ax, (key, label, higher) in zip(axes, MEASURES):
        for method in dict.fromkeys(s["method"] for s in result["summary"]):
            pts = [(s["steps"], s[key]) for s in result["summary"] if s["method"] == method and s.get(key) is not None]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_title(label + (" (higher is better)" if higher else " (lower is better)"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    st = result["setting"]
    fig.suptitle(f"toy prior, stages {'+'.join(st['stages'])}, {len(st['prompts'])} prompts, {st['views']} views", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _csv(text: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated (default all four)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated step budgets")
    p.add_argument("--prompts", default=";".join(PROMPTS), help="semicolon-separated toy-world prompts")
    p.add_argument("--stages", default="stage1", help="comma-separated stages to run (stage1, geometry, texture, refine)")
    p.add_argument("--preset", default="toy")
    p.add_argument("--views", type=int, default=24, help="evaluation views per asset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting overrides, e.g. --set prior.kind=tiny (repeatable)")
    p.add_argument("--evaluator", default=None, help="toy evaluator folder (default: the shipped one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench-out/compare_3d", help="folder for the assets and quality_vs_steps.png")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _csv(args.methods)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    from dreamflow.toyworld.world import parse_prompt

    prompts = _csv(args.prompts, ";")
    for prompt in prompts:
        try:
            parse_prompt(prompt)
        except ValueError as exc:
            p.error(str(exc))
    result = run(methods, prompts, [int(b) for b in _csv(args.budgets)], _csv(args.stages), args.preset, args.views,
                 args.seed, parse_cli_overrides(args.overrides), args.out, args.evaluator,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(result))
    png = plot(result, Path(args.out) / "quality_vs_steps.png")
    print(f"plot: {png}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
