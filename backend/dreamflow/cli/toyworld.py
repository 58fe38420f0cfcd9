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
    tr = acts.add_parser("train", help="train the toy text-to-image model (a diffusers folder), from scratch or "
                                       "on from an earlier one")
    tr.add_argument("--out", required=True, help="output folder; the model lands in OUT/generator, "
                                                 "checkpoints in OUT/checkpoints/step-N")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--steps", type=int, default=None, help="UNet/text-encoder steps (default: the shipped model's)")
    tr.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: the shipped model's)")
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    tr.add_argument("--vae-from", default=None, metavar="DIR",
                    help="reuse the VAE of an earlier run's model folder instead of training one (saves its steps)")
    tr.add_argument("--init-from", default=None, metavar="DIR",
                    help="fine-tune an earlier run's model folder (its VAE, UNet and text encoder) instead of "
                         "starting from scratch")
    tr.add_argument("--resume", action="store_true", help="continue the run in OUT from its newest checkpoint")
    tr.add_argument("--batch", type=int, default=None, help="UNet/text-encoder batch size")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the shipped model's)")
    tr.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps")
    tr.add_argument("--views", type=int, default=None, help="colour renders per object of the 36")
    tr.add_argument("--oriented-views", type=int, default=None, help="colour renders per oriented object")
    tr.add_argument("--normal-views", type=int, default=None, help="normal-map renders per object")
    tr.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    tr.add_argument("--data-cache", default=None, metavar="FILE",
                    help="keep the rendered training set in FILE and reuse it when it matches (e.g. to resume)")
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
    """Train with the shipped model's settings (or the given overrides), from scratch or from --init-from."""
    from dataclasses import replace

    import torch

    from ..toyworld.train import TrainConfig, cached_training_set, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    changes = {k: v for k, v in (("seed", args.seed), ("steps", args.steps), ("vae_steps", args.vae_steps),
                                 ("batch", args.batch), ("lr", args.lr), ("warmup", args.warmup), ("views_per_object", args.views),
                                 ("oriented_views", args.oriented_views), ("normal_views", args.normal_views),
                                 ("checkpoint_every", args.checkpoint_every)) if v is not None}
    cfg = replace(cfg, **changes)
    for flag, folder, part in (("--vae-from", args.vae_from, "vae"), ("--init-from", args.init_from, "unet")):
        if folder is not None and not (Path(folder) / part / "config.json").is_file():
            print(f"error: {flag} {folder}: not a model folder with a {part}/ part "
                  f"(give an earlier run's OUT/generator)", file=sys.stderr)
            return 2
    log = lambda line: print(line, flush=True)  # noqa: E731
    data = cached_training_set(cfg, args.data_cache, log=log) if args.data_cache else None
    try:
        train(args.out, cfg, log=log, vae_from=args.vae_from, init_from=args.init_from, resume=args.resume, data=data)
    except FileNotFoundError as exc:
        print(f"error: {exc} (drop --resume to start the run)", file=sys.stderr)
        return 2
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
