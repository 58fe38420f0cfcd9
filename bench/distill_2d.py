"""The 2D experiment on an exact prior: what each method makes of a fixed step budget, fairly.

A Gaussian mixture in image space (default 3x8x8, K = 8 modes of std s = 0.05) stands in for
the text-to-image prior; P = 16 particles are optimised directly (``g(theta) = theta``) by the
project's one loop with plain SGD, so each particle moves ``step_size`` times the way to its
target every step. For a fair comparison:

- every method runs on the same budgets, the same starting particles and the same noise seed;
- every method gets its own step size per budget and scenario: the best of ``--grid`` on a
  *tuning* seed (seed + 1000: other starting particles and noise, same mixture) by
  ``tuning_rank`` (most prompted modes covered, then the spread ratio closest to 1), then one
  run on the evaluation seed reports it (tuning and evaluation never share particles or noise,
  so picking the best of the grid does not flatter a method);
- ``D_phi`` does not presuppose the answer: the particles' empirical denoiser with a kernel of
  width ``--kernel`` (default s/10; a kernel of width s makes "every particle on a mode centre"
  the fixed point), and, in the rows marked ``/learned``, a small MLP trained from scratch on the
  particles with the denoising loss (``LearnedScoreModel``, lr ``--phi-lr``): the approximate
  ``D_phi`` of practice;
- rows: ``apfo`` (one Euler step per timestep, 1.0 -> 0.0, the last onto sigma = 0), ``vsd``
  (t ~ U(0.02, 0.98), ProlificDreamer's 2D setting, no annealing), ``vsd-linear`` (VSD with t
  decreasing linearly 1.0 -> 0.0, DreamFlow Fig. 14c), ``vsd-dreamtime`` (VSD with t decreasing
  by DreamTime's weight, Fig. 14d), ``sds``, ``fsd``, and ``exact``: P exact samples, what a
  perfect sampler would score with P particles.

Two prompts: ``unconditional`` (the whole mixture) and ``guided`` (the first half of the modes,
against the whole mixture as the unconditional model; SDS at guidance 100, the others at 7.5).
Metrics per row (pipeline/image2d.py ``gmm_metrics``): prompted modes covered and the balance of
particles across them, the within-mode spread ratio (1 exact, ~0 collapse, > 1 noise), and an
unbiased kernel MMD against 1000 exact samples. ``--aggregate A.json B.json ...`` prints the
mean and spread over seeds of several runs.

    .venv/bin/python bench/distill_2d.py --seed S --json OUT
    .venv/bin/python bench/distill_2d.py --aggregate OUT0 OUT1 OUT2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace

import torch

from dreamflow.methods.loop import NumericalDivergence
from dreamflow.pipeline.image2d import Image2DConfig, gmm_metrics, optimise_particles
from dreamflow.priors.gmm import GaussianMixturePrior

BUDGETS = (50, 200, 500)
GRID = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TUNING_SEED_OFFSET = 1000
#: (row label, method, t schedule, score model)
VARIANTS = (
    ("apfo", "apfo", "method", "empirical"),
    ("vsd", "vsd", "method", "empirical"),
    ("vsd-linear", "vsd", "linear", "empirical"),
    ("vsd-dreamtime", "vsd", "dreamtime", "empirical"),
    ("sds", "sds", "method", "empirical"),
    ("fsd", "fsd", "method", "empirical"),
    ("apfo/learned", "apfo", "method", "learned"),
    ("vsd/learned", "vsd", "method", "learned"),
    ("vsd-linear/learned", "vsd", "linear", "learned"),
)
METRICS = ("modes_covered", "mode_balance", "spread_ratio", "mmd", "fraction_near_mode")


def tuning_rank(r: dict) -> tuple[float, float]:
    """How a step size ranks on the tuning seed: the most prompted modes covered, then the
    within-mode spread ratio closest to 1 (on a log scale, so that half and twice the exact
    spread tie). The MMD is not the criterion: its kernel, narrow enough to see within-mode
    detail, reads every set far from all samples alike, so it would rank particles 20 s off the
    modes above particles collapsed onto them; it stays an independent check in the rows."""
    if r.get("diverged"):
        return (math.inf, math.inf)
    spread = r["spread_ratio"]
    return (-r["modes_covered"], abs(math.log(spread)) if spread > 0 else float("inf"))


def run(seed: int = 0, dim: int = 8, modes: int = 8, particles: int = 16, std: float = 0.05,
        kernel: float | None = None, phi_lr: float = 1e-3, budgets: tuple[int, ...] = BUDGETS,
        grid: tuple[float, ...] = GRID, variants: tuple[tuple[str, str, str, str], ...] = VARIANTS,
        scenarios: tuple[str, ...] = ("unconditional", "guided")) -> dict:
    """All (scenario, method, budget) rows, each at its tuned step size, as a JSON-ready dict."""
    kernel = std / 10.0 if kernel is None else kernel
    base = GaussianMixturePrior.random((3, dim, dim), modes=modes, std=std, seed=seed)
    half = list(range(max(1, modes // 2)))
    prior = GaussianMixturePrior(base.means, std, groups={"half": half})
    cfg = Image2DConfig(prior="gmm", particles=particles, seed=seed, gmm_size=dim, gmm_modes=modes, gmm_std=std,
                        gmm_seed=seed, phi_kernel=kernel, phi_lr=phi_lr)
    optimise_particles(replace(cfg, steps=2), prior)  # warm-up, so the first row's seconds are not import time
    rows = []
    for scenario in scenarios:
        prompted = list(range(modes)) if scenario == "unconditional" else half
        prompt = "" if scenario == "unconditional" else "half"
        exact = gmm_metrics(prior, prior.sample(particles, prompted, seed=seed + 17), prompted, seed=seed)
        rows.append({"scenario": scenario, "method": "exact", "steps": 0, "step_size": None, "guidance": None,
                     **{k: exact[k] for k in (*METRICS, "modes")}, "seconds": 0.0, "tuning": []})
        for label, method, t_schedule, score_model in variants:
            for steps in budgets:
                run_cfg = replace(cfg, prompt=prompt, method=method, steps=steps, t_schedule=t_schedule,
                                  score_model=score_model)
                tuning = []
                for eta in grid:
                    tune_cfg = replace(run_cfg, seed=seed + TUNING_SEED_OFFSET, step_size=eta)
                    try:
                        x, _, _ = optimise_particles(tune_cfg, prior)
                    except NumericalDivergence:
                        # Too large a step for this method: the loop's rollbacks could not save it.
                        tuning.append({"step_size": eta, "diverged": True})
                        continue
                    m = gmm_metrics(prior, x, prompted, seed=tune_cfg.seed)
                    tuning.append({"step_size": eta, **{k: m[k] for k in METRICS}})
                # The tuning seed's best step; should it diverge on the evaluation seed, the next best
                # (recorded in the row, so the fallback is visible).
                eval_diverged = []
                for best in sorted((t for t in tuning if not t.get("diverged")), key=tuning_rank):
                    start = time.perf_counter()
                    try:
                        x, history, mcfg = optimise_particles(replace(run_cfg, step_size=best["step_size"]), prior)
                    except NumericalDivergence:
                        eval_diverged.append(best["step_size"])
                        continue
                    seconds = time.perf_counter() - start
                    break
                else:
                    raise NumericalDivergence(f"{label} at {steps} steps diverged at every step size of the grid")
                m = gmm_metrics(prior, x, prompted, seed=seed)
                rows.append({"scenario": scenario, "method": label, "steps": steps, "step_size": best["step_size"],
                             "guidance": mcfg.guidance, "score_model": score_model, "t_schedule": t_schedule,
                             **{k: m[k] for k in (*METRICS, "modes")},
                             "final_grad_norm": history[-1].grad_norm, "seconds": seconds, "tuning": tuning,
                             "eval_diverged_step_sizes": eval_diverged,
                             # The tuned step is the grid's largest or smallest: the grid may be too narrow.
                             "eta_at_grid_edge": best["step_size"] in (min(grid), max(grid))})
    return {"setting": {"seed": seed, "tuning_seed": seed + TUNING_SEED_OFFSET, "shape": [3, dim, dim],
                        "modes": modes, "particles": particles, "std": std, "kernel": kernel, "phi_lr": phi_lr,
                        "grid": list(grid), "budgets": list(budgets),
                        "tuned_on": "most modes covered, then |log spread_ratio|", "torch": torch.__version__},
            "rows": rows}


def table(rows: list[dict], spread: dict | None = None) -> str:
    """Fixed-width text tables, one per scenario; ``spread`` maps a row key to its per-metric std."""
    lines = []
    for scenario in sorted(dict.fromkeys(r["scenario"] for r in rows), key=("unconditional", "guided").index):
        lines.append(f"[{scenario}]")
        lines.append(f"{'method':22} {'steps':>5} {'eta':>5} {'modes':>9} {'balance':>7} {'spread':>11} {'mmd':>15}")
        for r in rows:
            if r["scenario"] != scenario:
                continue
            sd = (spread or {}).get((r["scenario"], r["method"], r["steps"]))
            eta = "-" if r["step_size"] is None else f"{r['step_size']:g}" + ("*" if r.get("eta_at_grid_edge") else "")
            eta += "!" if r.get("eval_diverged_step_sizes") else ""
            modes = f"{r['modes_covered']:.1f}/{r['modes']}"
            spread_txt = f"{r['spread_ratio']:.2f}" + (f"±{sd['spread_ratio']:.2f}" if sd else "")
            mmd_txt = f"{r['mmd']:.4f}" + (f"±{sd['mmd']:.4f}" if sd else "")
            lines.append(f"{r['method']:22} {r['steps']:5d} {eta:>5} {modes:>9} {r['mode_balance']:7.2f} "
                         f"{spread_txt:>11} {mmd_txt:>15}")
        lines.append("")
    if any(r.get("eta_at_grid_edge") for r in rows):
        lines.append("* the tuned step size is at the edge of the grid (in at least one seed): widen --grid")
    if any(r.get("eval_diverged_step_sizes") for r in rows):
        lines.append("! the tuned step size diverged on the evaluation seed: the row ran at the next best one")
    return "\n".join(lines)


def aggregate(results: list[dict]) -> tuple[list[dict], dict]:
    """Mean rows over several seeds' results, and the standard deviation of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        for r in result["rows"]:
            groups.setdefault((r["scenario"], r["method"], r["steps"]), []).append(r)
    mean_rows, spread = [], {}
    for key, rs in groups.items():
        row = dict(rs[0])
        for k in METRICS:
            row[k] = statistics.fmean(r[k] for r in rs)
        row["eta_at_grid_edge"] = any(r.get("eta_at_grid_edge") for r in rs)
        row["eval_diverged_step_sizes"] = [e for r in rs for e in r.get("eval_diverged_step_sizes", [])]
        etas = [r["step_size"] for r in rs if r["step_size"] is not None]
        row["step_size"] = statistics.median(etas) if etas else None
        spread[key] = {k: statistics.stdev([r[k] for r in rs]) if len(rs) > 1 else 0.0 for k in METRICS}
        mean_rows.append(row)
    return mean_rows, spread


def merge_scenarios(results: list[dict]) -> list[dict]:
    """One result per seed: runs of the same seed with different ``--scenarios`` or ``--methods``
    joined (the ``exact`` row, which every run makes alike, once)."""
    by_seed: dict[int, dict] = {}
    for result in results:
        seed = result["setting"]["seed"]
        merged = by_seed.setdefault(seed, {"setting": result["setting"], "rows": []})
        seen = {(r["scenario"], r["method"], r["steps"]) for r in merged["rows"]}
        merged["rows"] += [r for r in result["rows"] if (r["scenario"], r["method"], r["steps"]) not in seen]
    return list(by_seed.values())


def main(argv: list[str] | None = None) -> int:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=8, help="image size D of the 3xDxD samples")
    p.add_argument("--modes", type=int, default=8)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--std", type=float, default=0.05)
    p.add_argument("--kernel", type=float, default=None, help="empirical D_phi's kernel width (default std/10)")
    p.add_argument("--phi-lr", type=float, default=1e-3, help="learning rate of the learned D_phi")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated step budgets")
    p.add_argument("--grid", default=",".join(map(str, GRID)), help="comma-separated step sizes to tune over")
    p.add_argument("--methods", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--scenarios", default="unconditional,guided", help="comma-separated: unconditional, guided")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--aggregate", nargs="+", default=None, metavar="JSON",
                   help="print mean and spread over seeds of earlier --json results instead of running")
    args = p.parse_args(argv)
    if args.aggregate:
        results = merge_scenarios([json.loads(open(path).read()) for path in args.aggregate])
        rows, spread = aggregate(results)
        print(f"mean ± std over {len(results)} seeds: {sorted(r['setting']['seed'] for r in results)}; "
              f"eta = median tuned step size")
        print(table(rows, spread))
        return 0
    torch.set_num_threads(1)  # small tensors: threads cost more than they give
    budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    grid = tuple(float(g) for g in args.grid.split(",") if g.strip())
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown = wanted - {v[0] for v in VARIANTS}
    if unknown:
        p.error(f"unknown row label(s) {', '.join(sorted(unknown))}; choose from {', '.join(v[0] for v in VARIANTS)}")
    variants = tuple(v for v in VARIANTS if not wanted or v[0] in wanted)
    start, cpu_start = time.perf_counter(), time.process_time()
    scenarios = tuple(x.strip() for x in args.scenarios.split(",") if x.strip())
    if not scenarios or set(scenarios) - {"unconditional", "guided"}:
        p.error("--scenarios takes unconditional and/or guided")
    result = run(args.seed, args.dim, args.modes, args.particles, args.std, args.kernel, args.phi_lr, budgets, grid,
                 variants, scenarios)
    # CPU time is what the run costs; wall time on a shared machine also counts the others' jobs.
    result["setting"]["wall_seconds"] = time.perf_counter() - start
    result["setting"]["cpu_seconds"] = time.process_time() - cpu_start
    print(table(result["rows"]))
    print(f"{result['setting']['wall_seconds']:.0f} s wall, {result['setting']['cpu_seconds']:.0f} s CPU")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
