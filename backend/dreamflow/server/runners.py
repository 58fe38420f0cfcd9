"""Where jobs run: the one seam between the front door and the work.

The server (socket thread, store, subscriptions) never runs a job itself. It hands job ids to a
:class:`JobRunner` and receives stored events back through ``publish(job, message)``. Two runners
exist:

- the in-process :class:`~dreamflow.server.worker.Worker` (the default, nothing to install): one
  thread, one job at a time;
- :class:`~dreamflow.server.ray_runner.RayJobs` (``dreamflow serve --ray ADDRESS``): one Ray actor
  per job, placed by its GPU/CPU/memory needs, as many at once as the cluster has room for. Ray is
  imported only when this runner is chosen.

Clients cannot tell them apart: the same protocol, the same store, the same event stream.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from dreamflow_protocol import Message

from ..events import EventSink, JobControl
from .store import JobRecord, JobStore

#: Hands a stored event to the socket thread (thread-safe).
Publish = Callable[[JobRecord, Message], None]


class JobRunner(Protocol):
    """Runs queued jobs somewhere and records their events in the store."""

    def start(self) -> None:
        """Begin running queued jobs."""

    def stop(self) -> None:
        """Stop taking jobs; running ones stay resumable (or keep running remotely, to be re-attached)."""

    def enqueue(self, job_id: str) -> int:
        """Queue a job (new, or unfinished at start-up); its position (0 = next to run)."""

    def queued(self) -> list[str]:
        """Job ids waiting for room to run, in order."""

    def remove(self, job_id: str) -> bool:
        """Take a waiting job off the queue; False if it was not waiting."""

    def cancel_running(self, job_id: str, reason: str) -> bool:
        """Ask a running job to stop at its next step; False if it is not running here."""

    def running(self) -> list[str]:
        """Ids of the jobs running now."""

    def describe(self) -> dict[str, Any]:
        """Plain facts for the server's status reply (where jobs run, how many at once)."""


class JobQueue:
    """A runner's FIFO of waiting job ids: ``self._queue``, guarded by ``self._cond`` (set up by the runner)."""

    _queue: collections.deque[str]
    _cond: threading.Condition

    def enqueue(self, job_id: str) -> int:
        """Queue a job; its position (0 = next to run)."""
        with self._cond:
            self._queue.append(job_id)
            self._cond.notify_all()
            return len(self._queue) - 1

    def queued(self) -> list[str]:
        """Job ids waiting to run, in order."""
        with self._cond:
            return list(self._queue)

    def remove(self, job_id: str) -> bool:
        """Take a waiting job off the queue; False if it was not waiting."""
        with self._cond:
            try:
                self._queue.remove(job_id)
                return True
            except ValueError:
                return False


#: Builds a runner for a store and a publish callback (Server's ``job_runner`` argument).
JobRunnerFactory = Callable[[JobStore, Publish], JobRunner]


def run_spec(spec: Mapping[str, Any], input_arrays: Mapping[str, np.ndarray], out_dir: Path, sink: EventSink,
             control: JobControl, checkpoint_dir: Path, runner: Callable[..., Any] | None = None) -> Any:
    """Run one stored job spec with the pipeline (or ``runner``); the pipeline's result.

    What a job means is decided here once, for every runner: its config from the preset and
    overrides, its optional input mesh, its start stage.
    """
    from ..pipeline.config import build_config  # the pipeline layer, below the server

    config = build_config(spec.get("preset") or "preview", spec.get("overrides") or {}, prompt=spec["prompt"],
                          negative_prompt=spec.get("negative_prompt"), seed=spec.get("seed"), method=spec.get("method"))
    input_mesh = None
    if input_arrays:
        from ..export.mesh import MeshData

        input_mesh = MeshData.from_arrays(dict(input_arrays)).validate()
    if runner is None:
        from ..pipeline.job import run_job as runner
    return runner(config, out_dir, sink, control, input_mesh=input_mesh, start_stage=spec.get("start_stage"),
                  start_t=spec.get("start_t"), checkpoint_dir=checkpoint_dir)
