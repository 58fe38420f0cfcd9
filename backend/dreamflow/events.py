"""What a running job reports and how it is told to stop; the pipeline's only view of the outside.

The pipeline emits events into an :class:`EventSink`; the server turns them into protocol messages,
the one-shot CLI into a progress bar. Nothing here imports torch, zmq or the protocol.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


class Cancelled(Exception):
    """Raised inside a job when its control says stop; the job ends cleanly, not as an error."""


class EventSink(Protocol):
    """Receives a job's events: ``kind`` is a protocol message type (progress, preview, mesh, ...)."""

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Record one event; arrays travel as raw binary buffers, never pickled."""


class NullSink:
    """Drops every event (library use, tests that only want the result)."""

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Ignore the event."""


@dataclass
class RecordingSink:
    """Keeps every event in memory, in order (tests, the one-shot CLI's report)."""

    events: list[tuple[str, dict, dict]] = field(default_factory=list)

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Append the event."""
        self.events.append((kind, dict(fields), dict(arrays or {})))

    def of_kind(self, kind: str) -> list[tuple[str, dict, dict]]:
        """All recorded events of one kind."""
        return [e for e in self.events if e[0] == kind]


class JobControl:
    """Thread-safe stop flag checked by the optimisation loop once per step."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the job to stop at its next step."""
        self.reason = reason
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called."""
        return self._stop.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was asked to stop."""
        if self._stop.is_set():
            raise Cancelled(self.reason)
