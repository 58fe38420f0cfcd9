"""``dreamflow toyworld``: train the toy world's text-to-image model, or draw 2D samples from one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``toyworld`` subcommand and its ``train`` and ``sample`` actions."""
    p = sub.add_parser("toyworld", help="the toy world: train its text-to-image model, draw samples",
                       description="The toy world: 6 shapes x 6 colours ('a red cube', 'an orange torus').")
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    tr = acts.add_parser("train", help="train the toy text-to-image model from scratch (a diffusers folder)")
    tr.add_argument("--out", required=True, help="output folder; the model lands in OUT/generator, "
                                                 "checkpoints in OUT/checkpoints/step-N")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--steps", type=int, default=None, help="UNet/text-encoder steps (default: the shipped model's)")
    tr.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: the shipped model's)")
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    tr.add_argument("--vae-from", default=None, metavar="DIR",
                    help="reuse the VAE of an earlier run's model folder instead of training one (saves its steps)")
    tr.set_defaults(func=cmd_train)
    sa = acts.add_parser("sample", help="draw 2D samples of prompts from a toy model (a PNG grid per prompt set)")
    sa.add_argument("--model", default=None, help="diffusers folder (default: the shipped generator)")
    sa.add_argument("--prompts", nargs="*", default=None, help="prompts (default: all 36)")
    sa.add_argument("--per-prompt", type=int, default=4)
    sa.add_argument("--steps", type=int, default=30, help="DDIM steps")
    sa.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance, diffusers form")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", required=True, help="output PNG")
    sa.set_defaults(func=cmd_sample)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_train(args: argparse.Namespace) -> int:
    """Train from scratch with the shipped model's settings (or the given overrides)."""
    from dataclasses import replace

    import torch

    from ..toyworld.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    changes = {k: v for k, v in (("seed", args.seed), ("steps", args.steps), ("vae_steps", args.vae_steps)) if v is not None}
    cfg = replace(cfg, **changes)
    if args.vae_from is not None and not (Path(args.vae_from) / "vae" / "config.json").is_file():
        print(f"error: --vae-from {args.vae_from}: not a model folder with a vae/ part "
              f"(give an earlier run's OUT/generator)", file=sys.stderr)
        return 2
    train(args.out, cfg, log=lambda line: print(line, flush=True), vae_from=args.vae_from)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Write a grid of 2D samples (rows: prompts) to a PNG."""
    from ..config import ConfigError
    from ..toyworld import GENERATOR_FOLDER
    from ..toyworld.sampling import sample_images, save_grid
    from ..toyworld.world import PROMPTS, parse_prompt

    prompts = args.prompts or list(PROMPTS)
    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = sample_images(str(args.model or GENERATOR_FOLDER), prompts, args.per_prompt, steps=args.steps,
                           guidance=args.guidance, seed=args.seed)
    save_grid(images, len(prompts), Path(args.out))
    print(f"{len(prompts) * args.per_prompt} samples -> {args.out}")
    return 0
