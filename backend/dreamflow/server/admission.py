"""What a server accepts in a job spec from a client: ranges, the operator's cost caps, and paths.

A job sent to a server runs on the operator's machine, so it may name only what the operator
allows there: model ids (``org/name``), and files or folders under the folders passed to
``dreamflow serve --models-dir DIR`` (plus the models shipped inside the package). The check runs
when the spec arrives, before anything is loaded, and its message is the same whether a path
exists on the server or not, so a client learns nothing about the server's files. The one-shot
CLI (``dreamflow generate``) runs on the user's own machine and may use any local path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, check_ranges, path_settings

#: Models shipped inside the package (always allowed): dreamflow/toyworld/weights/...
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "toyworld" / "weights"
#: A Hugging Face model id: ``org/name`` (never absolute, never "." or ".." parts).
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
#: Values of a path setting that name something built into the package, not a path.
BUILTIN_NAMES = frozenset({"builtin"})


@dataclass(frozen=True)
class Admission:
    """A server's rules for client job specs."""

    models_dirs: tuple[Path, ...] = ()
    caps: Mapping[str, int] = field(default_factory=dict)  # "steps" / "resolution" -> the operator's maximum

    def __post_init__(self) -> None:
        roots = tuple(Path(os.path.realpath(d)) for d in (*self.models_dirs, SHIPPED_MODELS))
        object.__setattr__(self, "_roots", roots)

    def check(self, config: Any) -> None:
        """Raise ConfigError naming the first setting this server does not accept from a client."""
        check_ranges(config, self.caps)
        for name, kind, value in path_settings(config):
            if not self.allows(kind, value):
                raise ConfigError(self._refusal(name, kind, value))

    def allows(self, kind: str, value: str) -> bool:
        """Whether a client may name ``value`` for a path setting of ``kind`` ("model" or "file")."""
        if value in BUILTIN_NAMES or (kind == "model" and MODEL_ID.fullmatch(value) and ".." not in value):
            return True
        if not os.path.isabs(value):
            return False  # relative to the server's working folder: never a client's choice
        real = Path(os.path.realpath(value))  # links resolved: a link inside an allowed folder may not lead out
        return any(real == root or root in real.parents for root in self._roots)  # type: ignore[attr-defined]

    def _refusal(self, name: str, kind: str, value: str) -> str:
        what = "a model id (org/name) or " if kind == "model" else "'builtin' or "
        return (f"{name}: {value[:200]!r} is not allowed on this server: a job sent to a server may name {what}a path "
                f"under a folder its operator allows (dreamflow serve --models-dir DIR; this server allows "
                f"{len(self.models_dirs)} such folder{'s' if len(self.models_dirs) != 1 else ''} besides the shipped models)")
