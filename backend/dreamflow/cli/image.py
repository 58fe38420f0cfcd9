"""``dreamflow image``: the 2D experiment, distilling a prior into images directly."""

from __future__ import annotations

import argparse
import sys

from ..methods.registry import METHOD_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``image`` subcommand."""
    p = sub.add_parser("image", help="optimise images (or SD latents) directly with APFO/VSD/SDS/FSD (2D mode)",
                       description="2D mode: P particles are optimised directly (g(theta) = theta). With --prior gmm "
                                   "the prompt names a mixture component ('mode0', ...) or '' for all of them.")
    p.add_argument("prompt", help="text prompt (SD) or mixture component name (gmm; '' for the whole mixture)")
    p.add_argument("--prior", choices=("sd", "gmm"), default="gmm")
    p.add_argument("--method", choices=METHOD_NAMES, default="apfo")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--views-per-t", type=int, default=1,
                   help="updates per timestep of a decreasing schedule (the paper's l; 2D has no views: 1)")
    p.add_argument("--t-schedule", choices=("method", "linear", "dreamtime"), default="method",
                   help="the method's own times, or t decreasing 1.0 -> 0.0 linearly / by DreamTime's weight")
    p.add_argument("--step-size", type=float, default=1.0, help="multiplies every move (sgd: 1 = onto the target)")
    p.add_argument("--score-model", choices=("empirical", "learned"), default="empirical",
                   help="gmm: D_phi as the particles' empirical denoiser or a small network trained on them")
    p.add_argument("--phi-kernel", type=float, default=0.005,
                   help="gmm: kernel width of the empirical D_phi (keep it well below the mixture's std)")
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (images, report.json, loss.png)")
    p.add_argument("--model", default=None, help="SD model id or local diffusers folder (default SD 2.1-base)")
    p.add_argument("--phi-model", default="", help="base of the LoRA score model when it differs from --model")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--guidance", type=float, default=None, help="diffusers-form guidance (default: the method's)")
    p.add_argument("--optimiser", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: each particle moves exactly onto its target; adamw: the papers' optimiser")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--resolution", type=int, default=64, help="SD image size in pixels")
    p.add_argument("--modes", type=int, default=4, help="gmm: number of mixture components")
    p.add_argument("--size", type=int, default=16, help="gmm: image size in pixels")
    p.add_argument("--device", default="auto")
    p.add_argument("--offline", action="store_true", help="load models from local files only")
    p.set_defaults(func=cmd_image)


def cmd_image(args: argparse.Namespace) -> int:
    """Run the 2D distillation and print where the results are."""
    from ..pipeline.image2d import Image2DConfig, run_image2d
    from ..priors.latent_diffusion import PriorLoadError

    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, prior=args.prior, method=args.method,
                  steps=args.steps, views_per_t=args.views_per_t, t_schedule=args.t_schedule, step_size=args.step_size,
                  score_model=args.score_model, phi_kernel=args.phi_kernel,
                  particles=args.particles, seed=args.seed, guidance=args.guidance,
                  optimiser=args.optimiser, lr=args.lr, gmm_size=args.size, gmm_modes=args.modes,
                  phi_model=args.phi_model, resolution=args.resolution, device=args.device,
                  local_files_only=args.offline)
    if args.model:
        kwargs["model"] = args.model
    try:
        report = run_image2d(Image2DConfig(**kwargs), args.out)
    except (PriorLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    line = f"{args.method}: {report['steps']} steps in {report['seconds']:.1f} s -> {args.out}"
    if "metrics" in report:
        m = report["metrics"]
        line += (f" | near a mode {m['fraction_near_mode']:.0%}, modes covered {m['modes_covered']}/{m['modes']}, "
                 f"balance {m['mode_balance']:.2f}, spread ratio {m['spread_ratio']:.2f}, mmd {m['mmd']:.4f}")
    print(line)
    return 0
