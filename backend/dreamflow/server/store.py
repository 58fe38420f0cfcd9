"""The on-disk job store: one folder per job, every file written atomically, events append-only.

``STORE/jobs/<job_id>/`` holds ``spec.json`` (the submitted spec), ``input/`` (the input mesh's
arrays as .npy), ``state.json`` (state, progress, result files), ``events.log`` (every event with
its seq), ``events/`` (array payloads, one file per event that has arrays), ``checkpoints/`` (the
pipeline's stage checkpoints) and ``out/`` (result files).

Atomic writes: temp file in the same folder, fsync, ``os.replace``, fsync of the folder, so a
crash leaves the old or the new file, never a torn one. The event log is append-only; each record
is framed as ``length (u32) | crc32 (u32) | msgpack``, and a torn or corrupt tail (a crash during an
append) is detected on open and cut off, so replay never serves a half-written event.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np

from dreamflow_protocol import Message, new_id
from dreamflow_protocol.schema import FILE_NAME_PATTERN

JOB_ID = re.compile(r"[0-9a-f]{32}")
_RECORD_HEAD = struct.Struct("<II")
_MAX_RECORD = 64 * 1024 * 1024
ACTIVE_STATES = ("queued", "running", "cancelling")
TERMINAL_STATES = ("done", "failed", "cancelled")


class StoreError(RuntimeError):
    """A job store problem (unknown job, bad name, corrupt file), with the reason in words."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on Windows; os.replace is atomic there anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, chunks: list[bytes | memoryview] | bytes) -> None:
    """Write ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        for chunk in [chunks] if isinstance(chunks, (bytes, memoryview)) else chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as JSON."""
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write one array as .npy."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_job_id(job_id: str) -> str:
    """The id if it is 32 lowercase hex digits (so it can never name a path outside the store)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise StoreError(f"invalid job id {str(job_id)[:80]!r}: expected 32 lowercase hex digits")
    return job_id


@dataclass
class JobRecord:
    """One job: its folder, spec, state and event index. Methods are safe to call from any thread."""

    job_id: str
    folder: Path
    spec: dict[str, Any]
    state: dict[str, Any]
    offsets: list[tuple[int, int]] = field(default_factory=list)  # seq -> (offset, length) in events.log
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ state

    @property
    def next_seq(self) -> int:
        """The seq the next event will get (= number of stored events)."""
        with self.lock:
            return len(self.offsets)

    def update(self, **changes: Any) -> dict[str, Any]:
        """Change state fields in memory (no disk write)."""
        with self.lock:
            self.state.update(changes)
            self.state["updated"] = time.time()
            return dict(self.state)

    def save_state(self, **changes: Any) -> dict[str, Any]:
        """Change state fields and write state.json atomically."""
        with self.lock:
            snapshot = self.update(**changes)
            atomic_write_json(self.folder / "state.json", snapshot)
            return snapshot

    def transition(self, new_state: str, allowed_from: tuple[str, ...]) -> bool:
        """Atomically move to ``new_state`` if the job is in one of ``allowed_from``; whether it moved."""
        with self.lock:
            if self.state.get("state") not in allowed_from:
                return False
            self.save_state(state=new_state)
            return True

    def summary(self) -> dict[str, Any]:
        """Plain-data view for status replies."""
        with self.lock:
            s = dict(self.state)
            seq = len(self.offsets)
        return {"job": self.job_id, "state": s.get("state"), "prompt": str(self.spec.get("prompt", ""))[:200],
                "preset": self.spec.get("preset"), "method": self.spec.get("method"), "created": s.get("created"),
                "updated": s.get("updated"), "stage": s.get("stage"), "step": s.get("step"), "total": s.get("total"),
                "eta": s.get("eta"), "next_seq": seq, "error": s.get("error"), "files": list(s.get("files", [])),
                "resumes": s.get("resumes", 0)}

    # ----------------------------------------------------------------- events

    def append_event(self, msg: Message) -> Message:
        """Give ``msg`` the next seq, store it (arrays first, then the log record) and return it."""
        with self.lock:
            seq = len(self.offsets)
            msg.seq, msg.job = seq, self.job_id
            descs, payload_file = [], None
            if msg.arrays:
                payload_file = f"{seq:09d}.bin"
                chunks, offset = [], 0
                for name, arr in msg.arrays.items():
                    arr = np.ascontiguousarray(arr)
                    descs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset})
                    chunks.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
                    offset += arr.nbytes
                atomic_write_bytes(self.folder / "events" / payload_file, chunks)
            record = msgpack.packb({"seq": seq, "id": msg.id, "type": msg.type, "fields": msg.fields, "arrays": descs,
                                    "file": payload_file, "time": time.time()}, use_bin_type=True)
            with open(self.folder / "events.log", "ab") as fh:
                offset = fh.tell()
                fh.write(_RECORD_HEAD.pack(len(record), zlib.crc32(record)) + record)
                fh.flush()
                os.fsync(fh.fileno())
            self.offsets.append((offset + _RECORD_HEAD.size, len(record)))
            return msg

    def read_event(self, seq: int) -> Message:
        """Event ``seq`` exactly as it was stored (same id, fields and arrays)."""
        with self.lock:
            if not 0 <= seq < len(self.offsets):
                raise StoreError(f"job {self.job_id} has no event {seq}")
            offset, length = self.offsets[seq]
        try:
            with open(self.folder / "events.log", "rb") as fh:
                fh.seek(offset)
                record = msgpack.unpackb(fh.read(length), raw=False)
            arrays: dict[str, np.ndarray] = {}
            if record["file"]:
                blob = (self.folder / "events" / str(record["file"])).read_bytes()
                for d in record["arrays"]:
                    dtype = np.dtype(d["dtype"])
                    count = int(np.prod(d["shape"], dtype=np.int64))
                    arrays[d["name"]] = np.frombuffer(blob, dtype=dtype, count=count, offset=d["offset"]).reshape(d["shape"])
            if record["seq"] != seq:
                raise ValueError(f"the record holds seq {record['seq']}")
            return Message(record["type"], record["fields"], arrays, job=self.job_id, seq=record["seq"], id=record["id"])
        except (OSError, ValueError, KeyError, TypeError, msgpack.exceptions.UnpackException) as exc:
            # Changed on disk behind the store's back (bit rot, a truncated payload, a deleted folder).
            raise StoreError(f"job {self.job_id}: stored event {seq} is corrupt or missing ({type(exc).__name__}: "
                             f"{str(exc)[:160]})") from None

    def _load_log(self) -> int:
        """Index events.log; cut a torn or corrupt tail. The number of bytes cut."""
        path = self.folder / "events.log"
        if not path.exists():
            return 0
        data = path.read_bytes()
        pos, offsets = 0, []
        while pos + _RECORD_HEAD.size <= len(data):
            length, crc = _RECORD_HEAD.unpack_from(data, pos)
            start, end = pos + _RECORD_HEAD.size, pos + _RECORD_HEAD.size + length
            if length > _MAX_RECORD or end > len(data) or zlib.crc32(data[start:end]) != crc:
                break
            try:
                seq = msgpack.unpackb(data[start:end], raw=False)["seq"]
            except Exception:
                break
            if seq != len(offsets):
                break
            offsets.append((start, length))
            pos = end
        cut = len(data) - pos
        if cut:
            with open(path, "r+b") as fh:
                fh.truncate(pos)
                fh.flush()
                os.fsync(fh.fileno())
        self.offsets = offsets
        return cut

    # ----------------------------------------------------------------- files

    @property
    def out_dir(self) -> Path:
        """Where the pipeline writes the job's result files."""
        return self.folder / "out"

    @property
    def checkpoint_dir(self) -> Path:
        """Where the pipeline keeps stage checkpoints (the same folder on every resume)."""
        return self.folder / "checkpoints"

    def result_path(self, name: str) -> Path:
        """The path of result file ``name``, refused unless it is a listed file inside out/."""
        if not isinstance(name, str) or not FILE_NAME_PATTERN.fullmatch(name):
            raise StoreError(f"invalid file name {str(name)[:80]!r}")
        with self.lock:
            files = list(self.state.get("files", []))
        if name not in files:
            raise StoreError(f"job {self.job_id} has no result file {name!r} (files: {', '.join(files) or 'none yet'})")
        root = self.out_dir.resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            raise StoreError(f"result file {name!r} of job {self.job_id} is missing or outside the job folder")
        return path

    def input_mesh(self) -> dict[str, np.ndarray]:
        """The submitted input mesh's arrays (empty if none)."""
        return {name: np.load(self.folder / "input" / f"{name}.npy", allow_pickle=False)
                for name in self.spec.get("input_arrays", [])}


class JobStore:
    """All jobs under ``root/jobs``; loads existing ones on open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self.repairs: list[str] = []  # what open() found and fixed (torn logs, unreadable jobs)
        self._open()

    def _open(self) -> None:
        for folder in sorted(self.jobs_dir.iterdir()):
            if not folder.is_dir() or not JOB_ID.fullmatch(folder.name):
                continue
            try:
                spec = json.loads((folder / "spec.json").read_text())
                state = json.loads((folder / "state.json").read_text())
            except (OSError, ValueError) as exc:
                self.repairs.append(f"job {folder.name}: unreadable ({exc}); skipped")
                continue
            job = JobRecord(folder.name, folder, spec, state)
            cut = job._load_log()
            if cut:
                self.repairs.append(f"job {folder.name}: cut a torn event-log tail of {cut} bytes")
            self._jobs[job.job_id] = job

    def create(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> JobRecord:
        """A new queued job with its spec and input arrays on disk."""
        job_id = new_id()
        folder = self.jobs_dir / job_id
        for sub in ("events", "checkpoints", "out", "input"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        spec = dict(spec, input_arrays=sorted(arrays))
        for name, arr in arrays.items():
            atomic_save_npy(folder / "input" / f"{name}.npy", arr)
        atomic_write_json(folder / "spec.json", spec)
        now = time.time()
        job = JobRecord(job_id, folder, spec, {"state": "queued", "created": now, "updated": now, "files": [], "resumes": 0})
        job.save_state()
        with self._lock:
            self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> JobRecord:
        """The job, or StoreError naming the problem."""
        check_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise StoreError(f"unknown job {job_id}")
        return job

    def all(self) -> list[JobRecord]:
        """Every job, oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        return sorted(jobs, key=lambda j: j.state.get("created", 0))

    def __iter__(self) -> Iterator[JobRecord]:
        return iter(self.all())

    def prune(self, keep_jobs: int | None = None, keep_days: float | None = None, protect: Iterable[str] = (),
              now: float | None = None) -> list[str]:
        """Delete the oldest finished jobs beyond ``keep_jobs`` and those finished over ``keep_days`` ago.

        Queued and running jobs are never deleted, nor those in ``protect`` (e.g. being replayed);
        ``None`` means no limit. Returns the deleted job ids, oldest first.
        """
        now = time.time() if now is None else now
        protected = set(protect)
        with self._lock:
            finished = [j for j in self._jobs.values() if j.state.get("state") in TERMINAL_STATES]
        finished.sort(key=lambda j: (j.state.get("finished") or j.state.get("updated") or 0.0, j.job_id))
        doomed = []
        for rank, job in enumerate(finished):
            newer = len(finished) - rank - 1  # finished jobs newer than this one
            ended = job.state.get("finished") or job.state.get("updated") or 0.0
            too_many = keep_jobs is not None and newer >= keep_jobs
            too_old = keep_days is not None and now - ended > keep_days * 86400.0
            if (too_many or too_old) and job.job_id not in protected:
                doomed.append(job)
        for job in doomed:
            with self._lock:
                self._jobs.pop(job.job_id, None)
            # Renamed at once (a folder open() ignores, so a crash never leaves half a job); the
            # slow part, deleting the files, runs on its own thread so no caller waits for it.
            os.replace(job.folder, job.folder.with_name(f".deleted-{job.job_id}"))
        trash = list(self.jobs_dir.glob(".deleted-*"))  # this prune's, and any a crash left behind
        if trash:
            threading.Thread(target=_remove_folders, args=(trash,), name="dreamflow-store-prune", daemon=True).start()
        return [job.job_id for job in doomed]


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
