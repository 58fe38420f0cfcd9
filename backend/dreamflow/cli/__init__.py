"""The ``dreamflow`` command: one subcommand per module, each registering its own parser.

Subcommands: serve, submit, status, cancel, fetch, keys (server.py); generate, demo (generate.py);
image (image.py); models (models.py); toyworld (toyworld.py); eval, train-evaluator (evaluate.py);
bench is in bench/ (scripts, not installed).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines register(subparsers) and sets a ``func`` default returning an exit code.
_MODULES = ("dreamflow.cli.server", "dreamflow.cli.generate", "dreamflow.cli.image", "dreamflow.cli.models",
            "dreamflow.cli.toyworld", "dreamflow.cli.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="dreamflow", description="DreamFlow text-to-3D backend")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a subcommand that is absent
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dreamflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
