"""The toy generator on its own: 2D samples of its prompts, judged by the toy evaluator.

The bar: the 36 symmetric objects right in shape and in colour (at least 95 % on every shape and
every colour); the oriented objects (world.ORIENTED_PROMPTS) are reported beside them, and, with an
evaluator that has a view head, whether "<prompt>, front/side/back view" samples show that view.
Samples are drawn the standard diffusers way (toyworld.sampling: DDIM, classifier-free guidance, the
bare prompt); the evaluator is trained on renders of other seeds (toyworld.evaluator).

    PYTHONPATH=backend:shared .venv/bin/python bench/toy_2d.py [--model DIR] [--per-prompt 8] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _rates(right: list[bool], keys: list[str], names) -> dict[str, float]:
    """Share of right samples per key (shape or colour name), for the names that occur."""
    return {k: sum(r for r, g in zip(right, keys) if g == k) / keys.count(k) for k in names if k in keys}


def main(argv: list[str] | None = None) -> int:
    """Sample, classify, print per-shape and per-colour accuracy of both groups and the views."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped generator)")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: the shipped one)")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--per-view", type=int, default=2, help="samples of each oriented prompt per named view (0: none)")
    p.add_argument("--symmetric-only", action="store_true", help="only the 36 symmetric objects (an older model)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grid", default=None, help="write the samples as a PNG grid (one row per prompt)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from dreamflow.toyworld import GENERATOR_FOLDER
    from dreamflow.toyworld.evaluator import load_evaluator
    from dreamflow.toyworld.sampling import sample_images, save_grid
    from dreamflow.toyworld.world import ALL_PROMPTS, ALL_SHAPES, COLOURS, ORIENTED_PROMPTS, PROMPTS, parse_prompt

    model = str(args.model or GENERATOR_FOLDER)
    evaluator = load_evaluator(args.evaluator)
    prompts = list(PROMPTS if args.symmetric_only else ALL_PROMPTS)
    start = time.perf_counter()
    images = sample_images(model, prompts, args.per_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed)
    seconds = time.perf_counter() - start
    if args.grid:
        save_grid(images, len(prompts), Path(args.grid))
    shapes, colours = evaluator.classify(images)
    truth = [parse_prompt(q) for q in prompts for _ in range(args.per_prompt)]
    report = {"model": model, "samples": len(truth), "ddim_steps": args.steps, "guidance": args.guidance,
              "sampling_seconds": round(seconds, 1)}
    print(f"{len(truth)} samples of {len(prompts)} prompts in {seconds:.0f} s")
    for group, members in (("symmetric", PROMPTS), ("oriented", () if args.symmetric_only else ORIENTED_PROMPTS)):
        rows = [i for i, q in enumerate(q for q in prompts for _ in range(args.per_prompt)) if q in members]
        if not rows:
            continue
        ok_s = [shapes[i] == truth[i][0] for i in rows]
        ok_c = [colours[i] == truth[i][1] for i in rows]
        both = [a and b for a, b in zip(ok_s, ok_c)]
        n = len(rows)
        g = {"samples": n, "shape_accuracy": sum(ok_s) / n, "colour_accuracy": sum(ok_c) / n,
             "both_accuracy": sum(both) / n,
             "per_shape": _rates(both, [truth[i][0] for i in rows], ALL_SHAPES),
             "per_colour": _rates(both, [truth[i][1] for i in rows], COLOURS)}
        report[group] = g
        print(f"{group}: {n} samples, shape right {g['shape_accuracy']:.1%}, colour right {g['colour_accuracy']:.1%}, "
              f"both {g['both_accuracy']:.1%}")
        print("  per shape:  " + ", ".join(f"{k} {v:.0%}" for k, v in g["per_shape"].items()))
        print("  per colour: " + ", ".join(f"{k} {v:.0%}" for k, v in g["per_colour"].items()))
    if args.per_view and not args.symmetric_only and evaluator.view_head is not None:
        asked = [(q, v) for q in ORIENTED_PROMPTS for v in evaluator.config.views]
        shown = evaluator.classify_views(sample_images(model, [f"{q}, {v} view" for q, v in asked], args.per_view,
                                                       steps=args.steps, guidance=args.guidance, seed=args.seed + 1))
        wanted = [v for _, v in asked for _ in range(args.per_view)]
        report["views"] = {v: sum(s == w for s, w in zip(shown, wanted) if w == v) / wanted.count(v)
                           for v in evaluator.config.views}
        report["views"]["all"] = sum(s == w for s, w in zip(shown, wanted)) / len(wanted)
        print(f"views asked of the oriented objects ({len(wanted)} samples) shown as asked: "
              + ", ".join(f"{k} {v:.0%}" for k, v in report["views"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
