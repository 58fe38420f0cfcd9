"""Text to 3D with the toy preset: wall time per asset and quality of every stage's mesh.

Runs the job exactly as ``dreamflow generate PROMPT --preset toy`` does (pipeline.job.run_job, in
this process), records each stage's final mesh, and scores it against the toy world with the shipped
evaluator (R-precision over 120 views at elevation 15, as the papers) and the ground-truth measures
(Chamfer relative to the bbox diagonal, silhouette IoU, colour error dE76), and the surface measures
of export/measures.py (scale- and yaw-free Chamfer, normal consistency and area ratio; raw
half-extent; colour noise), all through toyworld.evaluate.score_stages. The issue's checks:
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
    from dreamflow.cli.evaluate import FinalMeshes
    from dreamflow.events import JobControl, NullSink
    from dreamflow.pipeline.config import build_config
    from dreamflow.pipeline.job import run_job
    from dreamflow.toyworld.evaluate import score_stages

    config = build_config("toy", overrides, prompt=prompt)
    sink = FinalMeshes(NullSink())
    start = time.perf_counter()
    result = run_job(config, out, sink, JobControl(), checkpoint_dir=out / "checkpoints")
    wall = time.perf_counter() - start
    row: dict = {"prompt": prompt, "wall_s": round(wall, 1),
                 "stage_s": {k: round(v.get("seconds", 0.0), 1) for k, v in result.report["stages"].items()}}
    row.update(score_stages(sink.meshes, prompt, scorer, views=views))
    return row


def stage_line(q: dict) -> str:
    """One stage's measures, short: R-precision, Chamfer, IoU, dE; then the surface measures (~ = scale- and yaw-free)."""
    def num(key: str, fmt: str) -> str:
        v = q.get(key)
        return "-" if v is None else format(v, fmt)

    return (f"R {num('r_precision', '.2f')} CD {num('chamfer_rel', '.3f')} IoU {num('silhouette_iou', '.2f')} "
            f"dE {num('colour_error', '.0f')} CD~ {num('chamfer_aligned', '.3f')} NC~ {num('normal_consistency', '.3f')} "
            f"area~ {num('area_ratio', '.2f')} h {num('half_extent', '.3f')} noise {num('colour_noise', '.1f')}")


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
        print(f"{prompt:26s} {row['wall_s']:6.1f} s\n" + "\n".join(f"  {s:9s} {stage_line(row[s])}" for s in stages),
              flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    n = len(rows)
    final = [r.get("refine") or r.get("texture") or r.get("stage1") for r in rows]
    print(f"{n} prompts: mean wall {sum(r['wall_s'] for r in rows) / n:.1f} s (max {max(r['wall_s'] for r in rows):.1f}); "
          f"final R-precision {sum(f['r_precision'] for f in final) / n:.3f}; stage-1 R-precision "
          f"{sum(r['stage1']['r_precision'] for r in rows) / n:.3f}")
    for key in ("normal_consistency", "area_ratio", "chamfer_aligned", "half_extent", "colour_noise"):
        print(f"  {key}: " + ", ".join(
            f"{stage} {sum(r[stage][key] for r in rows) / n:.3f}" for stage in ("stage1", "geometry", "texture", "refine")
            if all(stage in r and r[stage].get(key) is not None for r in rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
