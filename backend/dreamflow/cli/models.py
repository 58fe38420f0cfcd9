"""``dreamflow models list|fetch``: the diffusion models a preset needs, where they are, and getting them.

``list`` never touches the network. ``fetch`` downloads, through huggingface_hub (progress bars,
resumable), exactly the files the pipeline reads: model_index.json, the used parts' configs and
one set of weights per part in the precision the job will run in. A model already complete in the
cache is not looked up online at all.
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, parse_cli_overrides


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _config(args: argparse.Namespace):
    from ..pipeline.config import build_config

    return build_config(args.preset, parse_cli_overrides(args.overrides), method=args.method)


def _device_type(args: argparse.Namespace) -> str:
    if args.device != "auto":
        return args.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _revision(st) -> str:
    """The revision asked for, and the commit it resolved to in the cache (``main@1a2b3c4``)."""
    if st.files is None:
        return st.need.revision
    commit = st.files.commit
    if commit is None:
        return "-"
    return commit if commit == st.need.revision else f"{st.need.revision}@{commit[:7]}"


def _print_states(states, stream) -> None:
    from ..priors.hub import hub_cache_dir

    rows = [("role", "model", "revision", "used by", "where", "status", "size")]
    for st in states:
        where = "-" if st.files is None else ("local folder" if st.files.source == "folder" else "HF cache")
        size = "-" if st.files is None else _size(st.files.size_bytes())
        rows.append((st.need.role, st.need.model, _revision(st), ",".join(st.need.stages), where, st.status, size))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        stream.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    for st in states:
        if st.files is not None and st.files.named:
            stream.write(f"  {st.need.role}: {st.files.named} -> present as {st.files.model} (the same files)\n")
        if st.problem:
            stream.write(f"  {st.need.role}: {st.problem}\n")
    stream.write(f"Hugging Face cache: {hub_cache_dir()}\n")


def cmd_models(args: argparse.Namespace) -> int:
    """List or fetch the models of a preset."""
    from ..pipeline.models import model_states

    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device_type = _device_type(args)
    if args.action == "list":
        states = model_states(config, device_type)
        if not states:
            print(f"preset {args.preset!r} ({config.prior.kind} prior) needs no downloaded models")
            return 0
        _print_states(states, sys.stdout)
        return 0 if all(s.files is not None for s in states) else 1
    states = model_states(config, device_type)
    missing = [s for s in states if s.files is None]
    if not states:
        print(f"preset {args.preset!r} ({config.prior.kind} prior) needs no downloaded models")
        return 0
    if not missing:
        print("every model is already complete on this machine; nothing to download")
        _print_states(states, sys.stdout)
        return 0
    print(f"fetching {len(missing)} of {len(states)} models (only the files the pipeline reads)", file=sys.stderr)
    states = model_states(config, device_type, download=True)
    _print_states(states, sys.stdout)
    return 0 if all(s.files is not None for s in states) else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    p = sub.add_parser("models", help="list or download the diffusion models a preset needs")
    p.add_argument("action", choices=("list", "fetch"), help="list: where each model is; fetch: download what is missing")
    p.add_argument("--preset", default="paper", help="settings preset (default paper)")
    p.add_argument("--method", default=None, help="apfo (default), vsd, sds or fsd")
    p.add_argument("--device", default="auto",
                   help="the device the jobs will run on (decides the weights' precision variant; default: this machine's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set prior.model=/models/sd21-base (repeatable)")
    p.set_defaults(func=cmd_models)
