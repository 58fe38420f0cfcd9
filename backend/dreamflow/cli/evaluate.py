"""``dreamflow eval``: R-precision, ground-truth and surface measures of assets; ``dreamflow train-evaluator``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the prompt file {path}: {exc.strerror or exc}") from exc
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"the prompt file {path} holds no prompts (one per line)")
    return prompts


def _atomic_json(data: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class FinalMeshes:
    """An event sink in front of another that keeps each stage's final mesh (for per-stage scoring)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.meshes: dict = {}

    def emit(self, kind: str, fields, arrays=None) -> None:
        """Pass the event on; keep the mesh of a stage's ``final`` mesh event."""
        if kind == "mesh" and fields.get("final") and arrays:
            from ..export.mesh import MeshData

            self.meshes[fields["stage"]] = MeshData.from_arrays(dict(arrays))
        self.inner.emit(kind, fields, arrays)


def add_toy_quality(config, out: Path, report: dict, views: int = 120, stage_meshes: dict | None = None,
                    log=None) -> dict | None:
    """Score a finished job's asset against the toy world (R-precision with the shipped evaluator,
    ground-truth and surface measures) when its prompt is a toy-world prompt and its prior is a
    text-to-image model, and each stage's final mesh (``stage_meshes``, stage name -> MeshData) under
    ``stages`` by the measures that need no render (seconds, where a 120-view render of each stage
    would add minutes to the job; the bench renders them); store the result as ``toy_eval`` in ``report`` and in ``out/report.json``. None
    otherwise (the reference-object demo, prompts the world does not know). ``log`` hears progress."""
    from ..export.files import read_glb
    from ..toyworld.evaluate import knows_prompt, score_asset, score_stages
    from ..toyworld.scoring import load_scorer

    if config.prior.kind == "reference" or not knows_prompt(config.prompt):
        return None
    if log is not None:
        log(f"scoring the asset ({views} views){' and the surfaces of ' + str(len(stage_meshes)) + ' stage meshes' if stage_meshes else ''} "
            f"against the toy world ...")
    mesh = read_glb(out / report.get("files", {}).get("model", "model.glb"))
    scorer = load_scorer()
    result = score_asset(mesh, config.prompt, scorer, views=views)
    if stage_meshes:
        result["stages"] = score_stages(stage_meshes, config.prompt, None)
    report["toy_eval"] = result
    _atomic_json(report, out / "report.json")
    return result


def format_toy_quality(result: dict) -> str:
    """R-precision, the ground-truth and surface measures; then one line per stage when scored."""
    def num(values: dict, key: str, fmt: str) -> str:
        v = values.get(key)
        return "n/a" if v is None else format(v, fmt)

    def surface(values: dict) -> str:
        return (f"normal consistency {num(values, 'normal_consistency', '.3f')}, area ratio "
                f"{num(values, 'area_ratio', '.2f')} (raw {num(values, 'area_ratio_raw', '.2f')}), aligned Chamfer "
                f"{num(values, 'chamfer_aligned', '.4f')}, half-extent {num(values, 'half_extent', '.3f')} "
                f"(true {num(values, 'true_half_extent', '.3f')}), colour noise {num(values, 'colour_noise', '.1f')} dE "
                f"(true {num(values, 'true_colour_noise', '.1f')})")

    lines = [f"toy-world evaluation of {result['prompt']!r}: R-precision {result['r_precision']:.3f} "
             f"({result['views_right']}/{result['views']} views retrieve it among {result['prompt_set_size']} prompts), "
             f"Chamfer {num(result, 'chamfer_rel', '.4f')} of the bbox diagonal, silhouette IoU "
             f"{num(result, 'silhouette_iou', '.3f')}, colour error {num(result, 'colour_error', '.1f')} dE76 (CIELAB); "
             f"{surface(result)}"]
    for stage, values in (result.get("stages") or {}).items():
        lines.append(f"  {stage}: Chamfer {num(values, 'chamfer_rel', '.4f')}; {surface(values)}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    """Score each asset; print a table; write eval.json into each asset folder and --json if given."""
    import torch

    from ..accel import pick_device
    from ..export.mesh import MeshError
    from ..toyworld.evaluate import format_table, load_asset, score_asset, summarise
    from ..toyworld.scoring import ScorerLoadError, load_scorer

    try:
        if args.views < 1:
            raise ValueError(f"--views must be at least 1, got {args.views}")
        if args.prompt is not None and len(args.assets) != 1:
            raise ValueError("--prompt names the prompt of one asset; give exactly one ASSET with it")
        prompts = _read_prompts(args.prompts) if args.prompts else None
        assets = []
        for path in args.assets:
            mesh, prompt = load_asset(path)
            prompt = args.prompt or prompt
            if not prompt:
                raise ValueError(f"{path}: no prompt (no report.json with one); pass it with --prompt")
            assets.append((path, mesh, prompt))
        try:
            device = pick_device(args.device)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc
        scorer = load_scorer(args.clip, args.evaluator, device)
        rows = []
        # Scoped, not torch.set_grad_enabled(False): the command also runs inside other programs (tests).
        with torch.no_grad():
            for path, mesh, prompt in assets:
                row = {"asset": str(path), **score_asset(mesh, prompt, scorer, prompts, views=args.views,
                                                          ground_truth=not args.no_ground_truth, device=device)}
                rows.append(row)
                if Path(path).is_dir():
                    _atomic_json(row, Path(path) / "eval.json")
    except (ValueError, MeshError, ScorerLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"R-precision: fraction of the {args.views} views (elevation 15, distance 1.2) whose top-1 prompt among "
          f"{rows[0]['prompt_set_size']} is the asset's own; scorer {scorer.name}; dE76 in CIELAB; "
          f"~ = scale-free and yaw-free; h-ext raw (true 0.4)")
    if args.json:
        _atomic_json({"assets": rows, "mean": summarise(rows)}, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def cmd_train_evaluator(args: argparse.Namespace) -> int:
    """Train the toy evaluator from scratch and save it (the shipped weights come from this)."""
    from dataclasses import replace

    import torch

    from ..toyworld.evaluator import EvaluatorConfig, train_evaluator

    cfg = EvaluatorConfig()
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, report = train_evaluator(args.out, cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(report["held_out"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``train-evaluator`` subcommands."""
    p = sub.add_parser("eval", help="R-precision (and toy-world ground truth) of generated assets",
                       description="Render each asset from N views at elevation 15 and retrieve its prompt among the "
                                   "prompt set (R-precision, as DreamFusion/DreamFlow report it). For toy-world prompts "
                                   "also, against the true object: Chamfer distance, silhouette IoU and mean-colour error "
                                   "(raw: size and yaw count); the surface measures CD~ (Chamfer over the diagonal), NC~ "
                                   "(normal consistency, mean |cos| to the true normal at the closest point; 1 exact) and "
                                   "area~ (area ratio; above 1 is wrinkled), which are scale-free and yaw-free (the asset "
                                   "centred, scaled to the true bounding-box diagonal and turned about the vertical axis "
                                   "to its best fit: the prior cannot know size or yaw); raw h-ext (largest half-extent; "
                                   "the world's objects: 0.4) and area_ratio_raw (JSON); noise (colour noise: mean dE76 "
                                   "of each surface sample against its 16 nearest samples' mean; 0 for flat colour).")
    p.add_argument("assets", nargs="+", metavar="ASSET_DIR",
                   help="a folder written by `dreamflow generate` (model.glb + report.json), or a .glb file")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="the prompt set, one per line (default: the toy world's 36 prompts)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="score with a real CLIP model (Hugging Face id or local folder) instead of the toy evaluator")
    p.add_argument("--evaluator", default=None, metavar="DIR", help="a toy evaluator folder (default: the shipped one)")
    p.add_argument("--views", type=int, default=120, help="evaluation views (default 120, as the papers)")
    p.add_argument("--prompt", default=None, help="the asset's prompt, when it has no report.json")
    p.add_argument("--no-ground-truth", action="store_true", help="skip the toy-world ground-truth measures")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all results and their mean here")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto ...")
    p.set_defaults(func=cmd_eval)

    t = sub.add_parser("train-evaluator", help="train the toy world's evaluator (reproduces the shipped weights)")
    t.add_argument("--out", required=True, help="output folder (evaluator.safetensors + evaluator.json)")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the shipped setting)")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    t.set_defaults(func=cmd_train_evaluator)
