"""The toy generator on its own: 2D samples of all 36 prompts, judged by the toy evaluator.

The issue's bar: at least 90 % of the samples right in shape and in colour. Samples are drawn the
standard diffusers way (toyworld.sampling: DDIM, classifier-free guidance, the bare prompt); the
evaluator is PART B's classifier, trained on renders of another seed (toyworld.evaluator).

    PYTHONPATH=backend:shared .venv/bin/python bench/toy_2d.py [--model DIR] [--per-prompt 8] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Sample, classify, print per-shape and per-colour accuracy and the total."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped generator)")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: the shipped one)")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grid", default=None, help="write the samples as a PNG grid (one row per prompt)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from dreamflow.toyworld import GENERATOR_FOLDER
    from dreamflow.toyworld.evaluator import load_evaluator
    from dreamflow.toyworld.sampling import sample_images, save_grid
    from dreamflow.toyworld.world import COLOURS, PROMPTS, SHAPES, parse_prompt

    model = str(args.model or GENERATOR_FOLDER)
    start = time.perf_counter()
    images = sample_images(model, list(PROMPTS), args.per_prompt, steps=args.steps, guidance=args.guidance,
                           seed=args.seed)
    seconds = time.perf_counter() - start
    if args.grid:
        save_grid(images, len(PROMPTS), Path(args.grid))
    shapes, colours = load_evaluator(args.evaluator).classify(images)
    truth = [parse_prompt(p) for p in PROMPTS for _ in range(args.per_prompt)]
    ok_shape = [s == t[0] for s, t in zip(shapes, truth)]
    ok_colour = [c == t[1] for c, t in zip(colours, truth)]
    both = [a and b for a, b in zip(ok_shape, ok_colour)]
    n = len(truth)
    report = {"model": model, "samples": n, "ddim_steps": args.steps, "guidance": args.guidance,
              "sampling_seconds": round(seconds, 1), "shape_accuracy": sum(ok_shape) / n,
              "colour_accuracy": sum(ok_colour) / n, "both_accuracy": sum(both) / n,
              "per_shape": {s: sum(b for b, t in zip(both, truth) if t[0] == s) / (n / len(SHAPES)) for s in SHAPES},
              "per_colour": {c: sum(b for b, t in zip(both, truth) if t[1] == c) / (n / len(COLOURS)) for c in COLOURS}}
    print(f"{n} samples of the 36 prompts in {seconds:.0f} s: shape right {report['shape_accuracy']:.1%}, "
          f"colour right {report['colour_accuracy']:.1%}, both {report['both_accuracy']:.1%}")
    print("per shape:  " + ", ".join(f"{k} {v:.0%}" for k, v in report["per_shape"].items()))
    print("per colour: " + ", ".join(f"{k} {v:.0%}" for k, v in report["per_colour"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
