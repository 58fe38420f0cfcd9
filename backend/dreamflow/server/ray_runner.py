"""Jobs on a Ray cluster: each job on a detached actor, placed by its GPU/CPU/memory needs.

Imported only by ``dreamflow serve --ray ADDRESS``; nothing else in DreamFlow imports Ray.

How a job runs (and why this shape):

- **Our queue, Ray's placement.** The server keeps its own FIFO queue, and starts a job only when
  the cluster has a free slot (``min(total GPUs / job GPUs, total CPUs / job CPUs, ...)``, read
  from Ray every second, so nodes may come and go). Jobs beyond that wait with a position that
  ``status`` shows; Ray then places each started actor on a node where its resources are free.
- **An actor, not a task.** A job needs a side channel while it runs: cancel, and the event
  stream. A threaded actor (``max_concurrency``) runs the pipeline on one thread and answers
  ``pull`` (long-poll for events) and ``cancel`` on others. Cancel sets the job's
  :class:`JobControl`, which the optimisation loop checks every step.
- **Events through the object store.** ``pull`` returns the next events, in order, with their
  numpy arrays. Ray serialises numpy arrays out of band: they travel once, node to node, into the
  server's object store, and the server reads them in place (zero-copy) before writing them to
  the job's log and framing them for ZeroMQ. Our own ZeroMQ frames from the workers would have
  needed the front door (or a second door) reachable from every node, with its own keys; the
  object store needs nothing the cluster does not already have.
- **Exactly once.** Each event gets its message id on the worker. The server stores it under that
  id before it acknowledges it (the ``stored`` mark of a later pull; the server already fetches
  the next entries while it stores these), so a pull lost in flight is simply asked again, and a
  restarted server finds where it stopped by the ids it stored.
- **No shared file system.** Checkpoints are written on the worker's local disk; the worker
  notices each new one and sends it in the same ordered stream as the events, and the server
  writes it into the job's store (``jobs/<id>/checkpoints``). A retry, on any node, starts with
  the store's checkpoints copied to its local disk. Result files come back the same way.
- **Warm workers.** A worker whose job finished cleanly waits ``worker_idle_seconds`` (holding its
  slot) for the next queued job, which then skips Ray's placement, a new process and its imports:
  a fresh worker paid about 2.4 s of CPU per job for those on the 2-core VM (loaded models are not
  kept between jobs yet; a warm worker is where they could be). A job that fails or is cancelled ends its
  worker (freeing its GPU at once, and leaving no state a broken job may have left behind); an
  idle worker that no server claims ends itself a little later.
- **Faults.** An actor that dies (its node killed or removed) is started again from the last
  checkpoint the server holds, up to ``max_retries`` times, each with a ``log`` event; then the
  job fails with a clear message. A job that raises ends its actor, which frees its GPU. Actors
  are detached: a server that restarts re-attaches to them by name; an actor that hears from no
  server for ``orphan_seconds`` cancels its job and exits, and a later server resumes the job
  from its checkpoint.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, RayActorError

from dreamflow_protocol import Message, new_id, validate_message

from .. import __version__
from ..events import Cancelled, JobControl
from .runners import JobQueue, Publish, run_spec
from ..safe_files import atomic_write, is_link_free, make_dirs
from .store import TERMINAL_STATES, JobRecord, JobStore, StoreError
from .worker import JobSink, Worker, _free_gpu_memory, _plain

# A dead node shows as the actor's death, or, when the node held a call's reply, as that reply lost
# (ObjectReconstructionFailedError and kin): either way the worker is gone and the job is retried.
_WORKER_GONE = (RayActorError, ObjectLostError)
log = logging.getLogger("dreamflow.server")

#: Ray namespace of the job actors (named ``dreamflow-<job>-<attempt>``), so a restarted server finds them.
NAMESPACE = "dreamflow"
#: Checkpoint files the pipeline writes (``<stage>.pt``); nothing else in the folder travels.
_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.pt")
#: Un-acknowledged bytes an actor holds before the job waits for the server (bounded memory).
_MAX_PENDING_BYTES = 512 * 1024 * 1024
_MAX_PENDING_EVENTS = 4096
#: Seconds a pull waits for new events before it returns empty (the follower's heartbeat).
_PULL_WAIT = 0.5
#: Seconds an unreachable actor is given to come back before its job is retried elsewhere.
_UNAVAILABLE_SECONDS = 30.0
#: Seconds an idle worker waits beyond its server's idle limit before it ends itself (a server that
#: died cannot end it; one that lives ends it first, so the two never race for the same worker).
_IDLE_GRACE = 30.0
#: Seconds the server gives a warm worker to answer before it starts a fresh one instead.
_WARM_ANSWER = 10.0


@dataclass
class RayOptions:
    """``dreamflow serve --ray``: where the cluster is and what one job needs."""

    address: str = "auto"                  # auto | local | ray://host:port | host:port (a GCS address)
    job_gpus: float | None = None          # None: 1 when the cluster has GPUs, else 0
    job_cpus: float = 1.0
    job_memory_gb: float | None = None     # memory Ray reserves for each job (None: no reservation)
    max_retries: int = 2                   # restarts after a lost node; then the job fails
    worker_idle_seconds: float = 30.0      # a worker that finished a job waits this long for the next (0: one per job)
    orphan_seconds: float = 600.0          # an actor with no server for this long cancels its job and exits

    def check(self) -> None:
        """Raise ValueError naming a setting outside its range."""
        if self.job_gpus is not None and not 0 <= self.job_gpus <= 64:
            raise ValueError(f"--job-gpus must be in [0, 64] (got {self.job_gpus})")
        if not 0 < self.job_cpus <= 1024:
            raise ValueError(f"--job-cpus must be in (0, 1024] (got {self.job_cpus})")
        if self.job_memory_gb is not None and not 0 < self.job_memory_gb <= 4096:
            raise ValueError(f"--job-memory must be in (0, 4096] GiB (got {self.job_memory_gb})")
        if not 0 <= self.max_retries <= 100:
            raise ValueError(f"--job-retries must be in [0, 100] (got {self.max_retries})")
        if not 0 <= self.worker_idle_seconds <= 3600:
            raise ValueError(f"--worker-idle must be in [0, 3600] seconds (got {self.worker_idle_seconds})")
        if not self.orphan_seconds > 0:
            raise ValueError(f"orphan_seconds must be positive (got {self.orphan_seconds})")


# ---------------------------------------------------------------------------------------- worker side


class _StreamSink:
    """The pipeline's EventSink on a worker: every event (and each new checkpoint) as an ordered entry."""

    def __init__(self, actor: "JobActor") -> None:
        self.actor = actor

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Queue one event for the server, after any checkpoint written since the last one."""
        self.actor._collect_checkpoints()
        if kind == "progress":
            self.actor._last_step = (str(fields.get("stage")), int(fields.get("step", 0)))
        arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
        self.actor._append(("event", new_id(), kind, dict(fields), arrays, time.time()),
                           sum(a.nbytes for a in arrays.values()))


class JobActor:
    """A Ray worker that runs one job at a time (created with ``ray.remote(JobActor).options(...)``)."""

    def __init__(self, orphan_seconds: float, idle_seconds: float) -> None:
        self._cond = threading.Condition()
        self._contact = time.monotonic()
        self._orphan_seconds = orphan_seconds
        self._idle_seconds = idle_seconds
        self._idle_since: float | None = None  # set while it waits, warm, between jobs
        self._closing = False
        self.jobs_run = 0
        self._clear(None)
        threading.Thread(target=self._watchdog, name="dreamflow-worker-watchdog", daemon=True).start()

    def _clear(self, job_id: str | None) -> None:
        """Forget the last job's state; ready for ``job_id`` (None: idle)."""
        self.job_id = job_id
        self.folder = Path(tempfile.mkdtemp(prefix=f"dreamflow-{job_id[:12]}-")) if job_id else None
        self.control = JobControl()
        self._entries: collections.deque[tuple] = collections.deque()  # entries from index _base on
        self._sizes: collections.deque[int] = collections.deque()
        self._base = 0
        self._pending_bytes = 0
        self._ids: dict[str, int] = {}  # event id -> entry index, for a re-attaching server
        self._end: dict[str, Any] | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._thread: threading.Thread | None = None
        self._last_step: tuple[str, int] | None = None  # the last progress event's (stage, step)
        self._cancel_step: tuple[str, int] | None = None  # ...when the cancel arrived

    # Methods the server calls.

    def info(self) -> dict[str, Any]:
        """Where this job runs."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(), "version": __version__,
                "jobs_run": self.jobs_run}

    def start(self, job_id: str, spec: dict[str, Any], input_arrays: dict[str, np.ndarray],
              checkpoints: dict[str, np.ndarray]) -> bool:
        """Start a job on its own thread, from the checkpoints the server holds; False if this worker is
        busy or ending (the server then starts a fresh one)."""
        with self._cond:
            if self._closing or self.job_id is not None:
                return False
            self._idle_since = None
            self._contact = time.monotonic()
            self._clear(job_id)
            self.jobs_run += 1
        ckpt_dir = self.folder / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name, data in checkpoints.items():
            if _CHECKPOINT_NAME.fullmatch(name):
                (ckpt_dir / name).write_bytes(memoryview(data))
        self._seen = _checkpoint_stats(ckpt_dir)  # what the server already has is not sent back
        self._thread = threading.Thread(target=self._run, args=(spec, input_arrays), name="dreamflow-job", daemon=True)
        self._thread.start()
        return True

    def pull(self, cursor: int, wait: float, stored: int) -> dict[str, Any]:
        """Entries from ``cursor`` on; the end once all are taken. Those before ``stored`` are in the server's
        store: dropped here (``stored`` trails ``cursor`` while the server fetches ahead)."""
        with self._cond:
            self._contact = time.monotonic()
            while self._base < stored and self._entries:
                self._entries.popleft()
                self._pending_bytes -= self._sizes.popleft()
                self._base += 1
            self._cond.notify_all()  # room for a job waiting on a full buffer
            total = self._base + len(self._entries)
            if cursor >= total and self._end is None and wait > 0:
                self._cond.wait(wait)
                total = self._base + len(self._entries)
            entries = list(self._entries)[max(0, cursor - self._base):]
            done = self._end is not None and cursor + len(entries) >= total
            return {"entries": entries, "next": cursor + len(entries), "end": self._end if done else None}

    def cursor_after(self, job_id: str, stored_ids: list[str]) -> int:
        """The index after the newest entry whose event id the server has stored (0 if none); -1 if this
        worker is not running ``job_id``."""
        with self._cond:
            self._contact = time.monotonic()
            if job_id != self.job_id:
                return -1
            return max((self._ids[i] + 1 for i in stored_ids if i in self._ids), default=0)

    def cancel(self, job_id: str, reason: str) -> None:
        """Stop the job at its next optimisation step (a cancel for a job this worker has left is ignored)."""
        with self._cond:
            if job_id != self.job_id:
                return
            self._cancel_step = self._last_step
            self.control.cancel(reason)
            self._cond.notify_all()

    def finish_job(self) -> bool:
        """The server has stored the job's end: drop its files and wait, warm, for the next job."""
        with self._cond:
            if self._end is None or self._closing:
                return False
            shutil.rmtree(self.folder, ignore_errors=True)
            self._clear(None)
            self._idle_since = time.monotonic()
            return True

    # The job's side.

    def _append(self, entry: tuple, size: int) -> None:
        with self._cond:
            while ((self._pending_bytes > _MAX_PENDING_BYTES or len(self._entries) >= _MAX_PENDING_EVENTS)
                   and not self.control.cancelled):
                self._cond.wait(1.0)  # the server is slow or away: the job waits rather than grow without bound
            index = self._base + len(self._entries)
            self._entries.append(entry)
            self._sizes.append(size)
            self._pending_bytes += size
            self._ids[entry[1]] = index
            self._cond.notify_all()

    def _collect_checkpoints(self) -> None:
        ckpt_dir = self.folder / "checkpoints"
        for name, stat in sorted(_checkpoint_stats(ckpt_dir).items()):
            if self._seen.get(name) != stat:
                self._seen[name] = stat
                data = np.fromfile(ckpt_dir / name, dtype=np.uint8)
                self._append(("checkpoint", new_id(), name, data), data.nbytes)

    def _run(self, spec: dict[str, Any], input_arrays: dict[str, np.ndarray]) -> None:
        out_dir = self.folder / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            result = run_spec(spec, input_arrays, out_dir, _StreamSink(self), self.control, self.folder / "checkpoints")
            self._collect_checkpoints()
            files = {str(k): str(v) for k, v in (getattr(result, "files", {}) or {}).items()}
            blobs = {}
            for rel in sorted(set(files.values())):
                path = (out_dir / rel).resolve()
                if out_dir.resolve() in path.parents and path.is_file():
                    blobs[Path(rel).as_posix()] = np.fromfile(path, dtype=np.uint8)
            end = {"state": "done", "files": files, "blobs": blobs, "report": _plain(getattr(result, "report", None) or {}),
                   "seconds": time.perf_counter() - start}
        except Cancelled as exc:
            if self._cancel_step is not None and self._last_step is not None:
                (stage, at), (_, last) = self._cancel_step, self._last_step
                _StreamSink(self).emit("log", {"level": "info", "stage": stage, "message":
                                               f"the cancel reached the worker after {stage} step {at}; "
                                               f"the job stopped after step {last}"})
            end = {"state": "cancelled", "reason": str(exc) or "cancelled"}
        except Exception as exc:
            end = {"state": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-8000:]}
        finally:
            _free_gpu_memory()
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def _watchdog(self) -> None:
        while True:
            time.sleep(min(5.0, self._orphan_seconds / 4))
            with self._cond:
                now = time.monotonic()
                if self._idle_since is not None and now - self._idle_since > self._idle_seconds + _IDLE_GRACE:
                    self._closing = True  # idle, and no server claimed it: give the node its slot back
                    os._exit(0)
                silent = now - self._contact
            if silent > self._orphan_seconds and self._idle_since is None:
                break
        # No server has asked for this job's events for a long time: stop it (the server that
        # comes back resumes it from its checkpoint) and give the node's GPU back.
        self.control.cancel("no server followed this job")
        if self._thread is not None:
            self._thread.join(120)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        os._exit(0)

    def __del__(self) -> None:
        if getattr(self, "folder", None) is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _checkpoint_stats(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.iterdir():
        if _CHECKPOINT_NAME.fullmatch(path.name) and path.is_file():
            st = path.stat()
            out[path.name] = (st.st_mtime_ns, st.st_size)
    return out


# ---------------------------------------------------------------------------------------- server side


class _Lost(Exception):
    """The job's actor is gone (its node died, or it was killed)."""

    def __init__(self, why: str, actor: Any = None) -> None:
        super().__init__(why)
        self.actor = actor


class RayJobs(JobQueue):
    """The server's JobRunner on a Ray cluster (see the module docstring); waiting jobs queue in the server."""

    def __init__(self, store: JobStore, publish: Publish, options: RayOptions) -> None:
        options.check()
        self.store = store
        self.publish = publish
        self.options = options
        self._queue: collections.deque[str] = collections.deque()
        self._reattach: list[str] = []
        self._cond = threading.Condition()
        self._stop = False
        self._running: dict[str, Any] = {}  # job id -> its actor handle (None while it is being placed)
        self._idle: list[tuple[Any, str, float]] = []  # warm workers between jobs: (actor, name, idle since)
        self._placing: set[str] = set()  # jobs whose new actor waits for Ray to place it
        self._cancels: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._slots = 0
        self._slots_read = 0.0
        self._free: dict[str, float] = {}
        self._job_gpus = 0.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=2048)
        self._latency_lock = threading.Lock()
        self._actor_class: Any = None
        self._dispatcher = threading.Thread(target=self._dispatch, name="dreamflow-ray-dispatch", daemon=True)

    # JobRunner ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the cluster and start placing queued jobs."""
        address = self.options.address
        kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING,
                                  "configure_logging": False}
        if address == "local":
            kwargs.update(include_dashboard=False)  # a private instance on this machine
        else:
            kwargs["address"] = address
            _probe(address)  # ray.init would wait minutes for an address where nothing answers
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is the same message
            raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {type(exc).__name__}: {exc}") from None
        total = ray.cluster_resources()
        self._job_gpus = self.options.job_gpus if self.options.job_gpus is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
        self._actor_class = ray.remote(JobActor)
        self._read_slots(force=True)
        log.info("Ray cluster at %s: %s; each job takes %s GPU, %s CPU%s; %d at once", address,
                 _resources_text(total), _num(self._job_gpus), _num(self.options.job_cpus),
                 f", {_num(self.options.job_memory_gb)} GiB" if self.options.job_memory_gb else "", self._slots)
        self._dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following jobs; their actors keep running, and a restarted server re-attaches to them."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in [self._dispatcher, *self._threads]:
            if thread.is_alive():
                thread.join(timeout)
        with self._cond:
            idle, self._idle = self._idle, []
        for actor, _, _ in idle:
            _kill(actor)  # no job on them: nothing a restarted server could re-attach to
        if ray.is_initialized():
            ray.shutdown()

    def enqueue(self, job_id: str) -> int:
        """Queue a job; one that was running when the server stopped is re-attached instead."""
        job = self.store.get(job_id)
        if job.state.get("state") == "running" and job.state.get("ray_actor"):
            with self._cond:
                self._reattach.append(job_id)
                self._cond.notify_all()
            return 0
        return super().enqueue(job_id)

    def cancel_running(self, job_id: str, reason: str) -> bool:
        """Tell a running job's actor to stop at its next step (or drop it before it starts)."""
        with self._cond:
            if job_id not in self._running:
                return False
            self._cancels[job_id] = reason
            actor = self._running[job_id]
        if actor is not None:
            actor.cancel.remote(job_id, reason)  # fire and forget: the follower sees the job end
        return True

    def running(self) -> list[str]:
        """Jobs with an actor (placed, or being placed)."""
        with self._cond:
            return list(self._running)

    def describe(self) -> dict[str, Any]:
        """Where jobs run, how many at once, and what the relay adds to each event's latency."""
        with self._latency_lock:  # appended to by the follower threads
            lat = sorted(self._latencies)
        pct = (lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)) if lat else (lambda q: None)
        return {"runner": "ray", "ray_address": self.options.address, "slots": self._slots, "free": dict(self._free),
                "warm_workers": len(self._idle),
                "job_resources": {"GPU": self._job_gpus, "CPU": self.options.job_cpus,
                                  "memory_gb": self.options.job_memory_gb},
                "relay_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "events": len(lat)}}

    # Placement ------------------------------------------------------------------------------

    def _read_slots(self, force: bool = False) -> int:
        now = time.monotonic()
        if force or now - self._slots_read > 1.0:
            total = ray.cluster_resources()
            need = {"GPU": self._job_gpus, "CPU": self.options.job_cpus,
                    "memory": (self.options.job_memory_gb or 0) * 2 ** 30}
            self._slots = int(min(math.floor(total.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0))
            free = ray.available_resources()
            self._free = {k: free.get(k, 0.0) for k in ("GPU", "CPU")}
            self._slots_read = now
        return self._slots

    def _dispatch(self) -> None:
        while True:
            try:
                slots = self._read_slots()  # at most once a second; nodes come and go
            except Exception as exc:  # the cluster's head is briefly unreachable: keep the last figures
                log.warning("cannot read the Ray cluster's resources: %s", _short(exc))
                slots = self._slots
            with self._cond:
                if self._stop:
                    return
                reattach, self._reattach = self._reattach, []
                launch, warm = None, None
                # A warm worker holds a slot of its own: the next job takes it before a new one is placed.
                if self._queue and (self._idle or len(self._running) + len(self._idle) < slots):
                    launch = self._queue.popleft()
                    warm = self._idle.pop() if self._idle else None
                for job_id in [*reattach, *([launch] if launch else [])]:
                    self._running[job_id] = None
                now = time.monotonic()
                # A new actor waiting for a node may be waiting for the very slot a warm worker holds.
                expired = [w for w in self._idle if now - w[2] > self.options.worker_idle_seconds or self._placing]
                self._idle = [w for w in self._idle if w not in expired]
                if not reattach and launch is None:
                    if not expired:
                        self._cond.wait(1.0)
            for actor, _, _ in expired:
                _kill(actor)  # no job came for it: its node gets the slot back
            for job_id in reattach:
                self._follow(job_id, reattach=True)
            if launch is not None:
                self._follow(launch, reattach=False, warm=warm)

    def _follow(self, job_id: str, reattach: bool, warm: tuple[Any, str, float] | None = None) -> None:
        thread = threading.Thread(target=self._run_job, args=(job_id, reattach, warm), name=f"dreamflow-ray-{job_id[:8]}",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    # One job --------------------------------------------------------------------------------

    def _run_job(self, job_id: str, reattach: bool, warm: tuple[Any, str, float] | None = None) -> None:
        try:
            job = self.store.get(job_id)
        except StoreError as exc:
            log.error("job %s vanished from the store: %s", job_id, exc)
            self._forget(job_id)
            if warm is not None:
                with self._cond:
                    self._idle.append(warm)  # still warm, for the next job
            return
        sink = JobSink(job, self.publish)
        requeue = False
        try:
            if reattach:
                actor, cursor = self._attach(job, sink)
                requeue = actor is None  # gone: it waits for a free slot like any retry
            else:
                actor, cursor = self._launch(job, sink, warm), 0
            if actor is not None:
                self._relay(job, sink, actor, cursor)
        except _Stopped:
            pass  # the server stops; the actor goes on, and a restarted server re-attaches to it
        except _Lost as exc:
            _kill(exc.actor)  # make sure it is gone before a retry starts elsewhere
            requeue = self._lost(job, sink, str(exc))
        except Exception as exc:  # a bug or a full disk here must not stop the other jobs
            log.exception("job %s: the Ray runner failed", job_id)
            try:
                if job.state.get("state") not in TERMINAL_STATES:
                    self._terminal(job, Message("error", {"message": f"the server lost the job: {type(exc).__name__}: {exc}"[:4096],
                                                          "code": "job_failed"}, job=job_id, seq=0),
                                   state="failed", error=f"{type(exc).__name__}: {exc}"[:4096])
            except Exception:
                log.exception("job %s could not record its end", job_id)
        finally:
            self._forget(job_id)
        if requeue:
            with self._cond:
                self._queue.appendleft(job_id)  # a retry goes first: it was started before the waiting jobs
                self._cond.notify_all()

    def _forget(self, job_id: str) -> None:
        with self._cond:
            self._running.pop(job_id, None)
            self._cancels.pop(job_id, None)
            self._cond.notify_all()

    def _launch(self, job: JobRecord, sink: JobSink, warm: tuple[Any, str, float] | None = None) -> Any:
        """Start the job on a warm worker, or create its actor and wait until Ray has placed it."""
        attempt = int(job.state.get("ray_attempts", 0)) + 1
        resumed = attempt > 1 or job.state.get("state") == "running"
        job.save_state(state="running", started=time.time(), ray_attempts=attempt,
                       resumes=job.state.get("resumes", 0) + int(resumed))
        checkpoints = {p.name: np.fromfile(p, dtype=np.uint8) for p in sorted(job.checkpoint_dir.glob("*.pt"))
                       if _CHECKPOINT_NAME.fullmatch(p.name)}
        inputs = job.input_mesh()
        t0 = time.perf_counter()
        started = self._start_warm(job, warm, checkpoints, inputs) if warm is not None else None
        if started is None:
            name = f"dreamflow-{job.job_id}-{attempt}"
            job.save_state(ray_actor=name)
            options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached", "max_restarts": 0,
                                       "max_concurrency": 4, "num_gpus": self._job_gpus, "num_cpus": self.options.job_cpus}
            if self.options.job_memory_gb:
                options["memory"] = int(self.options.job_memory_gb * 2 ** 30)
            actor = self._actor_class.options(**options).remote(self.options.orphan_seconds, self.options.worker_idle_seconds)
            with self._cond:
                self._running[job.job_id] = actor
                self._placing.add(job.job_id)
            try:
                info = self._wait(job, actor, actor.info.remote())
            finally:
                with self._cond:
                    self._placing.discard(job.job_id)
            if info is None:
                return None  # cancelled while it waited for a node
            if info.get("version") != __version__:
                ray.kill(actor)
                raise RuntimeError(f"node {info.get('host')} runs dreamflow {info.get('version')}, this server "
                                   f"{__version__}: install the same version on every node")
            if self._wait(job, actor, actor.start.remote(job.job_id, dict(job.spec), inputs, checkpoints)) is None:
                return None  # cancelled before it started (_wait has ended the actor)
            started = (actor, info)
        actor, info = started
        with self._cond:
            reason = self._cancels.get(job.job_id)
        if reason is not None:
            actor.cancel.remote(job.job_id, reason)  # it came before the worker knew the job
        placed = time.perf_counter() - t0
        job.save_state(ray_node=info, ray_start_seconds=placed)
        where = f"node {info['host']} ({info['ip']}, {info['node_id'][:8]}), GPU {','.join(info['gpu_ids']) or 'none'}"
        how = f"on a warm worker (its job {info['jobs_run'] + 1})" if info.get("jobs_run") else "placed and started"
        text = f"running on {where}; {how} in {placed:.1f} s"
        if checkpoints:
            text += f"; resuming from the checkpoints {', '.join(sorted(checkpoints))}"
        sink.emit("log", {"level": "info", "message": text})
        return actor

    def _start_warm(self, job: JobRecord, warm: tuple[Any, str, float], checkpoints: dict[str, np.ndarray],
                    inputs: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]] | None:
        """Start the job on a worker left warm by an earlier job: (actor, info), or None (it is gone or
        ending, and has been ended), so that a fresh one is placed instead."""
        actor, name, _ = warm
        with self._cond:
            self._running[job.job_id] = actor
        job.save_state(ray_actor=name)
        try:
            info = ray.get(actor.info.remote(), timeout=_WARM_ANSWER)
            if ray.get(actor.start.remote(job.job_id, dict(job.spec), inputs, checkpoints), timeout=_WARM_ANSWER):
                return actor, info
        except Exception as exc:  # noqa: BLE001 - any failure of a spare worker only costs a fresh one
            log.info("job %s: the warm worker %s did not take it (%s); placing a new one", job.job_id, name, _short(exc))
        _kill(actor)
        with self._cond:
            self._running[job.job_id] = None
        return None

    def _attach(self, job: JobRecord, sink: JobSink) -> tuple[Any, int]:
        """Find the actor of a job that ran when the server stopped; (actor, cursor), or (None, 0) to start afresh."""
        name = str(job.state.get("ray_actor"))
        actor = None
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            with self._cond:
                self._running[job.job_id] = actor
            stored = [job.read_event(seq).id for seq in range(max(0, job.next_seq - 64), job.next_seq)]
            cursor = ray.get(actor.cursor_after.remote(job.job_id, stored), timeout=60)
            if cursor < 0:
                actor = None  # a worker of that name runs another job now: it is not this job's to stop
                raise ValueError("the worker runs another job")
        except (ValueError, *_WORKER_GONE, GetTimeoutError, StoreError) as exc:
            log.info("job %s: its actor %s is gone (%s); resuming from the checkpoint", job.job_id, name, type(exc).__name__)
            if actor is not None:
                _kill(actor)  # found but not answering: make sure it cannot run beside the new attempt
            sink.emit("log", {"level": "info", "message": "server restarted; the job's worker is gone, so it resumes "
                                                          "from its last checkpoint"})
            return None, 0
        sink.emit("log", {"level": "info", "message": "server restarted; re-attached to the job still running on the cluster"})
        log.info("job %s: re-attached to %s at entry %d", job.job_id, name, cursor)
        return actor, cursor

    def _wait(self, job: JobRecord, actor: Any, ref: Any) -> Any:
        """ray.get that notices a cancel, a stopping server and a dead actor while it waits."""
        while True:
            if self._stop:
                raise _Stopped()
            if job.job_id in self._cancels and ref is not None:
                # Still waiting for a node (or for the start call): nothing ran, so end it here.
                ray.kill(actor)
                self._terminal(job, Message("cancelled", {"reason": self._cancels[job.job_id][:256]}, job=job.job_id, seq=0),
                               state="cancelled")
                return None
            try:
                return ray.get(ref, timeout=1.0)
            except GetTimeoutError:
                continue
            except _WORKER_GONE as exc:
                raise _Lost(_short(exc), actor) from None

    def _relay(self, job: JobRecord, sink: JobSink, actor: Any, cursor: int) -> None:
        """Store and publish the job's entries until it ends; then end its actor (freeing its GPU)."""
        unavailable_since = None
        stored = cursor  # entries below it are in the store: the actor may drop them
        ref = actor.pull.remote(cursor, _PULL_WAIT, stored)
        while True:
            if self._stop:
                return  # the actor keeps running; a restarted server re-attaches to it
            try:
                batch = ray.get(ref, timeout=60.0)
                unavailable_since = None
            except GetTimeoutError:
                continue
            except ActorUnavailableError as exc:
                # Unreachable for now (a network blip, or a node on its way out): lost if it lasts.
                unavailable_since = unavailable_since or time.monotonic()
                if time.monotonic() - unavailable_since > _UNAVAILABLE_SECONDS:
                    raise _Lost(_short(exc), actor) from None
                time.sleep(0.5)
                ref = actor.pull.remote(cursor, _PULL_WAIT, stored)
                continue
            except _WORKER_GONE as exc:
                raise _Lost(_short(exc), actor) from None
            cursor = batch["next"]
            if batch["end"] is None:
                # Ask for the next entries now, so the round trip overlaps with storing these.
                ref = actor.pull.remote(cursor, _PULL_WAIT, stored)
            for entry in batch["entries"]:
                if entry[0] == "checkpoint":
                    _, _, name, data = entry
                    if _CHECKPOINT_NAME.fullmatch(name):
                        atomic_write(job.checkpoint_dir / name, [memoryview(data)], strict=True)
                        # The pipeline checkpoints right after a step's progress event: that step.
                        job.save_state(ray_checkpoint=[job.state.get("stage"), job.state.get("step")])
                else:
                    _, event_id, kind, fields, arrays, emitted = entry
                    sink.emit(kind, fields, arrays, event_id=event_id)
                    with self._latency_lock:
                        self._latencies.append(max(0.0, time.time() - emitted))
            stored = cursor
            if batch["end"] is not None:
                self._finish(job, batch["end"])
                if batch["end"]["state"] != "done" or not self._keep_warm(actor, str(job.state.get("ray_actor"))):
                    _kill(actor)  # a failed or cancelled job ends its worker: its GPU is free at once
                return

    def _keep_warm(self, actor: Any, name: str) -> bool:
        """Keep a worker whose job is done for the next queued job; False if it is not kept."""
        if self.options.worker_idle_seconds <= 0 or self._stop or self._placing:
            return False  # (a job waiting for a node may need this worker's slot)
        try:
            if not ray.get(actor.finish_job.remote(), timeout=_WARM_ANSWER):
                return False
        except Exception:  # noqa: BLE001 - a worker that cannot answer is simply not kept
            return False
        with self._cond:
            self._idle.append((actor, name, time.monotonic()))
            self._cond.notify_all()
        return True

    def _finish(self, job: JobRecord, end: dict[str, Any]) -> None:
        if end["state"] == "done":
            # No link inside the store is followed (safe_files): the out folder and every part of a name.
            if not is_link_free(job.folder, "out"):
                raise StoreError("the job's out folder is a symbolic link or missing; refusing to write through it")
            for rel, data in end["blobs"].items():
                parts = Path(rel).parts
                if Path(rel).is_absolute() or not parts or any(p in ("..", ".") for p in parts):
                    raise StoreError(f"the worker reported a result file {rel!r} outside the job's out folder")
                if len(parts) > 1:
                    make_dirs(job.out_dir, *parts[:-1])
                atomic_write(job.out_dir / rel, [memoryview(data)], strict=True)
            files = Worker._result_files(job, end["files"])
            job.save_state(files=files)
            fields = {"files": files, "seconds": end["seconds"], "report": end["report"]}
            self._terminal(job, Message("job_done", fields, job=job.job_id, seq=0), state="done")
        elif end["state"] == "cancelled":
            self._terminal(job, Message("cancelled", {"reason": end["reason"][:256]}, job=job.job_id, seq=0), state="cancelled")
        else:
            log.error("job %s failed on its worker: %s\n%s", job.job_id, end["error"], end.get("traceback", ""))
            self._terminal(job, Message("error", {"message": end["error"][:4096], "code": "job_failed"}, job=job.job_id, seq=0),
                           state="failed", error=end["error"][:4096])

    def _lost(self, job: JobRecord, sink: JobSink, why: str) -> bool:
        """A job's actor died: queue a retry from its checkpoint (True), or fail it after the last retry."""
        if job.job_id in self._cancels:
            self._terminal(job, Message("cancelled", {"reason": self._cancels[job.job_id][:256]}, job=job.job_id, seq=0),
                           state="cancelled")
            return False
        lost = int(job.state.get("ray_lost", 0)) + 1
        job.save_state(ray_lost=lost)
        where = (job.state.get("ray_node") or {}).get("host", "?")
        saved = job.state.get("ray_checkpoint")
        since = f"the checkpoint saved at {saved[0]} step {saved[1]}" if saved else "the start (no checkpoint yet)"
        if lost > self.options.max_retries:
            text = (f"the job lost its worker {lost} times (last on node {where}: {why}); it was retried "
                    f"{self.options.max_retries} times and is given up; its checkpoints are kept in the store")
            self._terminal(job, Message("error", {"message": text[:4096], "code": "job_failed"}, job=job.job_id, seq=0),
                           state="failed", error=text[:4096])
            return False
        sink.emit("log", {"level": "warning", "message": f"the worker running this job on node {where} was lost ({why}); "
                                                         f"resuming from {since} on another node "
                                                         f"(retry {lost} of {self.options.max_retries})"})
        return True

    def _terminal(self, job: JobRecord, msg: Message, state: str, **extra: Any) -> None:
        validate_message(msg)
        job.save_state(state=state, finished=time.time(), ray_actor=None, **extra)
        self.publish(job, job.append_event(msg))


class _Stopped(_Lost):
    """The server is stopping (not a lost node): the job is left to a restarted server."""


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _num(x: float | None) -> str:
    return "0" if not x else (str(int(x)) if float(x).is_integer() else f"{x:g}")


def _resources_text(total: Mapping[str, float]) -> str:
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return (f"{nodes} node(s), {_num(total.get('GPU', 0))} GPU, {_num(total.get('CPU', 0))} CPU, "
            f"{total.get('memory', 0) / 2 ** 30:.0f} GiB")


def _probe(address: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError at once when nothing listens at a ``host:port`` or ``ray://host:port`` address."""
    rest = address.removeprefix("ray://")
    if address == "auto" or ":" not in rest:
        return  # "auto" is found by Ray itself, from this machine's running instance
    host, _, port = rest.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}; is its head node started "
                              f"(ray start --head), and is this machine allowed through its firewall?") from None


def ray_job_runner(options: RayOptions) -> Any:
    """A Server ``job_runner`` factory for these options."""
    return lambda store, publish: RayJobs(store, publish, options)
