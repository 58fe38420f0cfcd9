"""Text to 3D with the toy preset: wall time per asset and quality of every stage's mesh.

Runs the job exactly as ``dreamflow generate PROMPT --preset toy`` does (pipeline.job.run_job, in
this process), records each stage's final mesh, and scores it against the toy world with the shipped
evaluator (R-precision over 120 views at elevation 15, as the papers) and the ground-truth measures
(Chamfer relative to the bbox diagonal, silhouette IoU, colour error dE76). The issue's checks:
under 5 minutes wall per asset, R-precision of the final asset >= 0.9 over the 12 prompts, later
stages not worse than stage 1.

    PYTHONPATH=backend:shared .venv/bin/python bench/toy_text_to_3d.py --out /tmp/toy12 [PROMPT ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: 12 of the 36 prompts that cover every shape and every colour twice.
TWELVE = ("a red cube", "a green sphere", "a blue cylinder", "a yellow cone", "an orange torus",
          "a purple square pyramid", "a blue cube", "a yellow sphere", "an orange cylinder", "a purple cone",
          "a red torus", "a green square pyramid")


def run_one(prompt: str, out: Path, overrides: dict, views: int, scorer) -> dict:
    """One asset: wall time, per-stage seconds and per-stage quality."""
    from dreamflow.events import JobControl, RecordingSink
    from dreamflow.export.mesh import MeshData
    from dreamflow.pipeline.config import build_config
    from dreamflow.pipeline.job import run_job
    from dreamflow.toyworld.evaluate import score_asset

    config = build_config("toy", overrides, prompt=prompt)
    sink = RecordingSink()
    start = time.perf_counter()
    result = run_job(config, out, sink, JobControl(), checkpoint_dir=out / "checkpoints")
    wall = time.perf_counter() - start
    row: dict = {"prompt": prompt, "wall_s": round(wall, 1),
                 "stage_s": {k: round(v.get("seconds", 0.0), 1) for k, v in result.report["stages"].items()}}
    for kind, fields, arrays in sink.of_kind("mesh"):
        if not fields.get("final"):
            continue
        q = score_asset(MeshData.from_arrays(arrays), prompt, scorer, views=views)
        row[fields["stage"]] = {k: q.get(k) for k in ("r_precision", "chamfer_rel", "silhouette_iou", "colour_error")}
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the prompts, print one line each and a summary, write OUT/results.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", default=list(TWELVE))
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--views", type=int, default=120)
    args = p.parse_args(argv)
    from dreamflow.config import parse_cli_overrides
    from dreamflow.toyworld.scoring import load_scorer

    overrides = parse_cli_overrides(args.overrides)
    scorer = load_scorer()
    out = Path(args.out)
    rows = []
    for prompt in args.prompts:
        row = run_one(prompt, out / prompt.replace(" ", "_"), overrides, args.views, scorer)
        rows.append(row)
        stages = [s for s in ("stage1", "geometry", "texture", "refine") if s in row]
        print(f"{prompt:26s} {row['wall_s']:6.1f} s  " + "  ".join(
            f"{s} R {row[s]['r_precision']:.2f} CD {row[s]['chamfer_rel'] or float('nan'):.3f} "
            f"IoU {row[s]['silhouette_iou'] or float('nan'):.2f} dE {row[s]['colour_error'] or float('nan'):.0f}"
            for s in stages), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    n = len(rows)
    final = [r.get("refine") or r.get("texture") or r.get("stage1") for r in rows]
    print(f"{n} prompts: mean wall {sum(r['wall_s'] for r in rows) / n:.1f} s (max {max(r['wall_s'] for r in rows):.1f}); "
          f"final R-precision {sum(f['r_precision'] for f in final) / n:.3f}; stage-1 R-precision "
          f"{sum(r['stage1']['r_precision'] for r in rows) / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
