"""The worker thread: runs one job at a time, far from the socket.

It talks to the socket thread only through thread-safe objects: a job queue it takes from, and a
callback ``publish(job, message)`` that puts stored events on the socket thread's queue and rings
its doorbell. Events are written to the job's log here, before they are published, so a
subscriber replaying from disk can never miss one that was already sent live.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from dreamflow_protocol import Message, ProtocolError, validate_message
from dreamflow_protocol.schema import SCHEMAS, Nullable

from ..events import Cancelled, JobControl
from ..safe_files import is_link_free
from .runners import JobQueue, run_spec
from .store import TERMINAL_STATES, JobRecord, JobStore, StoreError

log = logging.getLogger("dreamflow.server")

#: Event kinds the pipeline may emit; the sink stores each as the protocol message of that type.
PIPELINE_KINDS = ("progress", "preview", "mesh", "stage_done", "log")


class Runner(Protocol):
    """The signature of ``dreamflow.pipeline.job.run_job`` (the worker's default runner)."""

    def __call__(self, config: Any, out_dir: Any, sink: Any, control: JobControl, *, input_mesh: Any = None,
                 start_stage: str | None = None, start_t: float | None = None, checkpoint_dir: Any = None) -> Any: ...


def default_runner(*args: Any, **kwargs: Any) -> Any:
    """The real pipeline, imported when the first job starts (the server starts without it)."""
    from ..pipeline.job import run_job

    return run_job(*args, **kwargs)


class JobSink:
    """The pipeline's EventSink for one job: checks, stores and publishes each event."""

    def __init__(self, job: JobRecord, publish: Callable[[JobRecord, Message], None]) -> None:
        self.job = job
        self.publish = publish
        self._warned: set[str] = set()

    def emit(self, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
             event_id: str | None = None) -> None:
        """Turn one pipeline event into a stored, published protocol message (``event_id``: its id, when given)."""
        fields = dict(fields)
        arrays = dict(arrays or {})
        if kind not in PIPELINE_KINDS:
            self._warn(f"kind:{kind}", f"the pipeline emitted an unknown event kind {kind!r}; dropped")
            return
        schema = SCHEMAS[kind]
        dropped = [k for k in fields if k not in schema.fields]
        for key in dropped:
            del fields[key]
            self._warn(f"{kind}.{key}", f"{kind} events carry no field {key!r}; dropped")
        for key, value in list(fields.items()):
            if key == "report":
                fields[key] = _plain(value)
            elif isinstance(value, (float, np.floating)) and not np.isfinite(value):
                # NaN/inf loss or ETA: sent as null where the schema allows it, else left out.
                if isinstance(schema.fields[key][0], Nullable):
                    fields[key] = None
                else:
                    del fields[key]
            elif isinstance(value, np.generic):
                fields[key] = value.item()
        if kind == "mesh":
            fields.setdefault("final", False)
            fields["object_id"] = self.job.spec.get("object_id")
            arrays = _canonical_mesh(arrays)
        if kind == "preview" and "image" not in arrays and len(arrays) == 1:
            arrays = {"image": next(iter(arrays.values()))}
        if kind == "preview" and "image" in arrays:
            arrays["image"] = _as_uint8_image(arrays["image"])
        msg = Message(kind, fields, arrays, job=self.job.job_id, seq=0, **({"id": event_id} if event_id else {}))
        try:
            validate_message(msg)
        except ProtocolError as exc:
            # A malformed preview must not end an hours-long job: report it and go on.
            log.debug("job %s: dropped a %s event: %s", self.job.job_id, kind, exc)
            self._warn(f"bad:{kind}", f"dropped a {kind} event the protocol refuses (reported once per kind): {exc}")
            return
        if kind == "progress":
            self.job.update(stage=fields["stage"], step=fields["step"], total=fields["total"], eta=fields.get("eta"))
        elif kind in ("stage_done",):
            self.job.save_state(stage=fields["stage"], last_stage_done=fields["stage"])
        self.publish(self.job, self.job.append_event(msg))

    def _warn(self, key: str, text: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("job %s: %s", self.job.job_id, text)
        msg = Message("log", {"level": "warning", "message": text[:4096]}, job=self.job.job_id, seq=0)
        self.publish(self.job, self.job.append_event(msg))


def _canonical_mesh(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in arrays.items():
        dtype = {"faces": np.int32, "texture": np.uint8}.get(name, np.float32)
        out[name] = np.ascontiguousarray(arr, dtype=dtype)  # copies only when the dtype differs
    return out


def _as_uint8_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


class Worker(JobQueue):
    """One thread that runs queued jobs in order with the injected runner."""

    def __init__(self, store: JobStore, publish: Callable[[JobRecord, Message], None], runner: Runner | None = None) -> None:
        self.store = store
        self.publish = publish
        self.runner: Runner = runner or default_runner
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.current: tuple[str, JobControl] | None = None
        self._thread = threading.Thread(target=self._run, name="dreamflow-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job (it stays resumable) and end the thread."""
        with self._cond:
            self._stop = True
            current = self.current
            self._cond.notify_all()
        if current is not None:
            current[1].cancel("server shutting down")
        self._thread.join(timeout)

    def cancel_running(self, job_id: str, reason: str) -> bool:
        """Tell the running job to stop at its next step; False if it is not the running one."""
        with self._cond:
            current = self.current
        if current is None or current[0] != job_id:
            return False
        current[1].cancel(reason)
        return True

    def running(self) -> list[str]:
        """The running job's id (a list: other runners run several at once)."""
        current = self.current
        return [current[0]] if current else []

    def describe(self) -> dict[str, Any]:
        """Where jobs run: here, one at a time."""
        return {"runner": "in-process", "slots": 1}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job_id = self._queue.popleft()
                control = JobControl()
                self.current = (job_id, control)
            try:
                self._run_job(self.store.get(job_id), control)
            except StoreError as exc:
                log.error("job %s vanished from the store: %s", job_id, exc)
            except Exception as exc:  # e.g. a full disk: the job could not even record its end
                # The worker must outlive it, or every later job would wait forever. Where even the
                # state could not be saved, state.json still says running and a restart resumes the job.
                log.exception("job %s could not record its end", job_id)
                try:
                    job = self.store.get(job_id)
                    if job.state.get("state") not in TERMINAL_STATES:
                        job.update(state="failed", error=f"{type(exc).__name__}: {exc}"[:4096])
                except StoreError:
                    pass
            finally:
                with self._cond:
                    self.current = None

    def _run_job(self, job: JobRecord, control: JobControl) -> None:
        sink = JobSink(job, self.publish)
        resumed = job.state.get("state") == "running"  # it was running when the server stopped
        job.save_state(state="running", started=time.time(), resumes=job.state.get("resumes", 0) + int(resumed))
        if resumed:
            sink.emit("log", {"level": "info", "message": "server restarted; resuming from the last checkpoint"})
        spec = job.spec
        start = time.perf_counter()
        try:
            for sub in ("out", "checkpoints"):
                if not is_link_free(job.folder, sub):  # the pipeline would write through it
                    raise StoreError(f"the job's {sub} folder is a symbolic link or missing; refusing to write through it")
            result = run_spec(spec, job.input_mesh(), job.out_dir, sink, control, job.checkpoint_dir, self.runner)
            files = self._result_files(job, getattr(result, "files", {}) or {})
            report = getattr(result, "report", None) or {}
            job.save_state(files=files)
            fields = {"files": files, "seconds": time.perf_counter() - start, "report": _plain(report)}
            self._terminal(job, Message("job_done", fields, job=job.job_id, seq=0), state="done")
        except Cancelled as exc:
            if control.reason == "server shutting down":
                job.save_state(state="running")  # left resumable: a restart picks it up again
                return
            self._terminal(job, Message("cancelled", {"reason": str(exc)[:256] or "cancelled"}, job=job.job_id, seq=0),
                           state="cancelled")
        except Exception as exc:  # the job failed; the server goes on
            text = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s\n%s", job.job_id, text, traceback.format_exc())
            self._terminal(job, Message("error", {"message": text[:4096], "code": "job_failed"}, job=job.job_id, seq=0),
                           state="failed", error=text[:4096])
        finally:
            _free_gpu_memory()

    def _terminal(self, job: JobRecord, msg: Message, state: str, **extra: Any) -> None:
        # The state first, then the event: a client that sees the terminal event (live, or from the
        # log) always finds the job finished; a crash in between is repaired on restart
        # (Server._restore_terminal_event appends the missing event).
        validate_message(msg)
        job.save_state(state=state, finished=time.time(), **extra)
        self.publish(job, job.append_event(msg))

    @staticmethod
    def _result_files(job: JobRecord, files: Mapping[str, str]) -> list[str]:
        names = []
        for rel in files.values():
            rel = Path(str(rel)).as_posix()
            try:
                with job.open_result_unlisted(rel):
                    pass
            except StoreError:
                raise StoreError(f"the pipeline reported a result file {rel!r} that is not a file inside the job's out "
                                 f"folder") from None
            names.append(rel)
        return sorted(set(names))


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON/msgpack-safe copy of a report (numpy scalars to Python, non-finite floats to None)."""
    if depth > 5:
        return str(value)[:200]
    if isinstance(value, Mapping):
        return {str(k)[:128]: _plain(v, depth + 1) for k, v in list(value.items())[:256]}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in list(value)[:256]]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, str) else value[:1024]
    return str(value)[:200]


def _free_gpu_memory() -> None:
    """Give cached CUDA memory back after a job, so the next one (or another program) has it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
