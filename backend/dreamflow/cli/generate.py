"""``dreamflow generate`` and ``dreamflow demo``: one job in this process, a progress bar on stderr.

``demo`` runs text to 3D on any machine with the toy world's small shipped prior (``--reference``:
the weight-free rebuild of a reference object, with its quality report); ``generate`` runs a text
prompt with a Stable Diffusion prior (``--preset toy``: the toy world's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

import numpy as np

from ..config import ConfigError, parse_cli_overrides

#: The prompt ``dreamflow demo`` makes by default (one of the toy world's 36).
DEMO_PROMPT = "a red cube"


class ProgressBar:
    """An EventSink that draws one progress line per stage on a stream.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed each time
    another ``every_percent`` of the stage is done, so the output stays short.
    """

    def __init__(self, stream: TextIO | None = None, every_percent: int = 10, width: int = 28):
        # sys.stderr is looked up now, not when the module was imported: it may have been replaced
        # since (pytest's capture, an embedding application) and the old stream closed.
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every_percent
        self.width = width
        self._last_bucket: dict[str, int] = {}
        self._open_line = False

    @staticmethod
    def _fmt_seconds(s: float | None) -> str:
        if s is None or not np.isfinite(s):
            return "?"
        s = int(round(s))
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

    def _line(self, f: Mapping[str, Any]) -> str:
        step, total = int(f["step"]), max(1, int(f["total"]))
        frac = step / total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        stage = f.get("stage", "?")
        pos = ""
        if "stage_index" in f and "stage_count" in f:
            pos = f" {int(f['stage_index']) + 1}/{int(f['stage_count'])}"
        loss = f.get("loss")
        loss_s = f"{loss:.3g}" if isinstance(loss, (int, float)) else "?"
        t = f.get("t")
        t_s = f" t={t:.3f}" if isinstance(t, (int, float)) else ""
        return (f"[{stage}{pos}] |{bar}| {step}/{total} {100 * frac:3.0f}% loss {loss_s}{t_s} "
                f"elapsed {self._fmt_seconds(f.get('elapsed'))} eta {self._fmt_seconds(f.get('eta'))}")

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Draw progress; announce finished stages and warnings."""
        if kind == "progress":
            line = self._line(fields)
            if self.tty:
                self.stream.write("\r" + line + "\x1b[K")
                self._open_line = True
            else:
                stage = str(fields.get("stage"))
                bucket = int(100 * int(fields["step"]) / max(1, int(fields["total"]))) // self.every
                if self._last_bucket.get(stage) != bucket:
                    self._last_bucket[stage] = bucket
                    self.stream.write(line + "\n")
            self.stream.flush()
        elif kind in ("stage_done", "log"):
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            if kind == "stage_done":
                metrics = (fields.get("report") or {}).get("metrics") or {}
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
                self.stream.write(f"[{fields.get('stage')}] done in {self._fmt_seconds(fields.get('seconds'))}"
                                  + (f" ({shown})" if shown else "") + "\n")
            else:
                self.stream.write(f"[{fields.get('stage', 'job')}] {fields.get('level', 'info')}: {fields.get('message')}\n")
            self.stream.flush()


def say_prompt(asked: str | None, config: Any, stream: TextIO | None = None) -> None:
    """One line when the job runs another form of the prompt than the one given (the toy world's words)."""
    if asked is not None and config.prompt != asked:
        print(f"using {config.prompt!r} (the toy world's words for {asked!r})", file=stream or sys.stderr)


def _run(config, out: Path, label: str) -> int:
    from ..events import JobControl
    from ..pipeline.job import run_job
    from .evaluate import FinalMeshes, add_toy_quality, format_toy_quality

    sink = FinalMeshes(ProgressBar())
    start = time.perf_counter()
    result = run_job(config, out, sink, JobControl(), checkpoint_dir=out / "checkpoints")
    wall = time.perf_counter() - start
    print(f"{label} finished in {wall:.1f} s; files in {out}:", file=sys.stderr)
    for name in result.files.values():
        print(f"  {out / name}", file=sys.stderr)
    quality = result.report.get("quality") or {}
    if quality:
        print("quality: " + json.dumps(quality), file=sys.stderr)
    toy = add_toy_quality(config, out, result.report, stage_meshes=sink.meshes,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    if toy is not None:
        print(format_toy_quality(toy), file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    shown = default_preset or "toy, or preview with --reference"
    p.add_argument("--preset", default=default_preset, help=f"settings preset (paper, preview, toy, smoke; default {shown})")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--method", default=None, help="apfo (default), vsd, sds or fsd")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by its dotted path, e.g. --set stage1.steps=200 (repeatable)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: the toy prompt with the toy preset, or (--reference) the reference-object rebuild."""
    from ..export.mesh import MeshError
    from ..pipeline.config import build_config
    from ..priors.latent_diffusion import PriorLoadError

    try:
        overrides = parse_cli_overrides(args.overrides)
        if args.reference is None:
            # Text to 3D with the toy world's own trained prior: the prompt decides what appears.
            config = build_config(args.preset or "toy", overrides, prompt=args.prompt, seed=args.seed,
                                  method=args.method, device=args.device)
            say_prompt(args.prompt, config)
            if config.prior.kind == "reference":
                raise ConfigError("the text demo needs a text prior; for the reference object use --reference builtin")
            return _run(config, Path(args.out), "demo")
        overrides.setdefault("prior.kind", "reference")
        overrides["prior.reference"] = str(args.reference)
        config = build_config(args.preset or "preview", overrides, seed=args.seed, method=args.method,
                              device=args.device)
        if config.prior.kind != "reference":
            raise ConfigError("the reference demo runs against the reference-object prior (prior.kind=reference)")
        return _run(config, Path(args.out), "demo")
    except (ConfigError, MeshError, PriorLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate an asset from a text prompt."""
    from ..export.mesh import MeshError
    from ..pipeline.config import build_config
    from ..priors.latent_diffusion import PriorLoadError

    try:
        if not args.prompt.strip():
            raise ConfigError("the prompt is empty; say what to generate, e.g. dreamflow generate \"a wooden chair\" --out out/chair")
        overrides = parse_cli_overrides(args.overrides)
        config = build_config(args.preset, overrides, prompt=args.prompt, negative_prompt=args.negative_prompt,
                              seed=args.seed, method=args.method, device=args.device)
        say_prompt(args.prompt, config)
        return _run(config, Path(args.out), "generate")
    except (ConfigError, MeshError, PriorLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` and ``generate`` subcommands."""
    demo = sub.add_parser("demo", help="end-to-end demo on a CPU: text to 3D with the shipped toy-world prior, "
                                       "or (--reference) the weight-free rebuild of a reference object")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--prompt", default=DEMO_PROMPT,
                      help=f"one of the toy world's 36 prompts (default {DEMO_PROMPT!r}); ignored with --reference")
    demo.add_argument("--reference", default=None, metavar="FILE",
                      help="rebuild a reference object instead: 'builtin' (the toy house) or a mesh file "
                           "(GLB, OBJ, PLY, ...); the preset then defaults to preview")
    _common(demo, None)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="text to a textured 3D asset, in this process")
    gen.add_argument("prompt", help="what to generate")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid")
    _common(gen, "paper")
    gen.set_defaults(func=cmd_generate)
