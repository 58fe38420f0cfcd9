"""The on-disk job store: one folder per job, every file written atomically, events append-only.

``STORE/jobs/<job_id>/`` holds ``spec.json`` (the submitted spec), ``input/`` (the input mesh's
arrays as .npy), ``state.json`` (state, progress, result files), ``events.log`` (every event with
its seq), ``events/`` (array payloads, one file per event that has arrays), ``checkpoints/`` (the
pipeline's stage checkpoints) and ``out/`` (result files).

Atomic writes (``dreamflow.safe_files``): temp file created exclusively in the same folder, fsync,
``os.replace``, fsync of the folder, so a crash leaves the old or the new file, never a torn one.
No link inside the store is ever followed: every component below ``jobs/`` is opened with
``O_NOFOLLOW``, and a job folder that is a link is refused. The event log is append-only; each
record is framed as ``length (u32) | crc32 (u32) | msgpack``. A torn tail (a crash during an
append) is cut on open; a damaged record with intact records after it is damage, not a tail: the
records after it are kept and its seq stays used (never given to a new event). A job whose
spec.json or state.json does not have the right shape is quarantined (moved to
``STORE/quarantine/``, named in ``repairs``, and answered ``corrupt_job`` at this and every later
start) and every other job is served.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import stat
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import msgpack
import numpy as np

from dreamflow_protocol import Message, ProtocolError, new_id
from dreamflow_protocol.schema import EVENT_TYPES, FILE_NAME_PATTERN, JOB_ID_PATTERN, MESH_ARRAYS, check_fields

from ..safe_files import atomic_write, make_dirs, open_file, read_bytes

JOB_ID = re.compile(r"[0-9a-f]{32}")
_RECORD_HEAD = struct.Struct("<II")
_RECORD_MAGIC = 0x87  # every record is a msgpack map of 7 keys (seq, id, type, fields, arrays, file, time)
_MAX_RECORD = 64 * 1024 * 1024
ACTIVE_STATES = ("queued", "running", "cancelling")
TERMINAL_STATES = ("done", "failed", "cancelled")


class StoreError(RuntimeError):
    """A job store problem (unknown job, bad name, corrupt file), with the reason in words and a protocol error code."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as JSON (no link followed)."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode(), strict=True)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write one array as .npy (no link followed); large arrays are written in chunks without the GIL."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    chunk = 16 * 1024 * 1024
    atomic_write(path, [header.getvalue(), *(data[i:i + chunk] for i in range(0, len(data), chunk))], strict=True)


def check_job_id(job_id: str) -> str:
    """The id if it is 32 lowercase hex digits (so it can never name a path outside the store)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise StoreError(f"invalid job id {str(job_id)[:80]!r}: expected 32 lowercase hex digits")
    return job_id


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


#: What each state.json field must hold (fields not listed are kept as they are).
_STATE_SHAPE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "state": (lambda v: v in ACTIVE_STATES + TERMINAL_STATES, f"one of {', '.join(ACTIVE_STATES + TERMINAL_STATES)}"),
    "created": (_number, "a time in seconds"),
    "updated": (_number, "a time in seconds"),
    "started": (_optional(_number), "a time in seconds"),
    "finished": (_optional(_number), "a time in seconds"),
    "files": (lambda v: isinstance(v, list) and all(isinstance(f, str) and FILE_NAME_PATTERN.fullmatch(f) for f in v),
              "a list of relative file names"),
    "resumes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a count"),
    "error": (_optional(lambda v: isinstance(v, str)), "text"),
    "stage": (_optional(lambda v: isinstance(v, str)), "a stage name"),
    "last_stage_done": (_optional(lambda v: isinstance(v, str)), "a stage name"),
    "step": (_optional(lambda v: isinstance(v, int) and not isinstance(v, bool)), "a step number"),
    "total": (_optional(lambda v: isinstance(v, int) and not isinstance(v, bool)), "a step count"),
    "eta": (_optional(_number), "seconds"),
}


def check_state(state: Any) -> dict[str, Any]:
    """``state`` if it has the shape of a job's state.json, else ValueError naming the field."""
    if not isinstance(state, dict):
        raise ValueError(f"state.json holds a {type(state).__name__}, not a map")
    for key in ("state", "created"):
        if key not in state:
            raise ValueError(f"state.json has no {key!r}")
    for key, (ok, want) in _STATE_SHAPE.items():
        if key in state and not ok(state[key]):
            raise ValueError(f"state.json's {key!r} is {str(state[key])[:60]!r}, not {want}")
    return state


def check_spec(spec: Any) -> dict[str, Any]:
    """``spec`` if it has the shape of a stored job spec (a checked submit), else ValueError naming the problem."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec.json holds a {type(spec).__name__}, not a map")
    arrays = spec.get("input_arrays", [])
    if not isinstance(arrays, list) or not all(a in MESH_ARRAYS for a in arrays):
        raise ValueError("spec.json's 'input_arrays' is not a list of mesh array names")
    submitted = {k: v for k, v in spec.items() if k != "input_arrays" and v is not None}
    try:
        check_fields("submit", submitted, "spec.json")
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return spec


@dataclass
class JobRecord:
    """One job: its folder, spec, state and event index. Methods are safe to call from any thread."""

    job_id: str
    folder: Path
    spec: dict[str, Any]
    state: dict[str, Any]
    offsets: list[tuple[int, int] | None] = field(default_factory=list)  # seq -> (offset, length); None: lost to damage
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
                atomic_write(self.folder / "events" / payload_file, chunks, strict=True)
            record = msgpack.packb({"seq": seq, "id": msg.id, "type": msg.type, "fields": msg.fields, "arrays": descs,
                                    "file": payload_file, "time": time.time()}, use_bin_type=True)
            fd = open_file(self.folder, "events.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(fd, "ab") as fh:
                offset = os.fstat(fd).st_size
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
            where = self.offsets[seq]
        if where is None:
            raise StoreError(f"job {self.job_id}: stored event {seq} was damaged on disk and is lost", code="corrupt_job")
        offset, length = where
        try:
            with os.fdopen(open_file(self.folder, "events.log"), "rb") as fh:
                fh.seek(offset)
                record = msgpack.unpackb(fh.read(length), raw=False)
            if not isinstance(record, dict) or record.get("type") not in EVENT_TYPES:
                raise ValueError("the record is not an event")
            fields = check_fields(record["type"], record["fields"], f"event {seq}")
            arrays: dict[str, np.ndarray] = {}
            if record["file"]:
                blob = read_bytes(self.folder, f"events/{record['file']}")
                for d in record["arrays"]:
                    dtype = np.dtype(d["dtype"])
                    count = int(np.prod(d["shape"], dtype=np.int64))
                    arrays[d["name"]] = np.frombuffer(blob, dtype=dtype, count=count, offset=d["offset"]).reshape(d["shape"])
            if record["seq"] != seq:
                raise ValueError(f"the record holds seq {record['seq']}")
            return Message(record["type"], fields, arrays, job=self.job_id, seq=seq, id=record["id"])
        except (OSError, ValueError, KeyError, TypeError, ProtocolError, msgpack.exceptions.UnpackException) as exc:
            # Changed on disk behind the store's back (bit rot, a truncated payload, a deleted folder, a link).
            raise StoreError(f"job {self.job_id}: stored event {seq} is corrupt or missing ({type(exc).__name__}: "
                             f"{str(exc)[:160]})", code="corrupt_job") from None

    def _load_log(self) -> tuple[int, int]:
        """Index events.log: cut a torn tail, keep intact records after damage. (bytes cut, events lost)."""
        try:
            data = read_bytes(self.folder, "events.log")
        except FileNotFoundError:
            self.offsets = []
            return 0, 0
        offsets: list[tuple[int, int] | None] = []
        pos = 0
        while pos + _RECORD_HEAD.size <= len(data):
            found = _record_at(data, pos)
            if found is None or found[2] < len(offsets):
                # Damage in the middle is told from a torn tail by what follows it: an intact record.
                found = _next_record(data, pos + 1, len(offsets))
                if found is None:
                    if _is_torn_tail(data, pos):
                        break
                    offsets.append(None)  # a complete but damaged last record: its seq stays used
                    pos = len(data)
                    break
            start, length, seq = found
            offsets.extend([None] * (seq - len(offsets)))  # records lost to damage keep their seqs
            offsets.append((start, length))
            pos = start + length
        cut = len(data) - pos
        if cut:
            with os.fdopen(open_file(self.folder, "events.log", os.O_RDWR), "r+b") as fh:
                fh.truncate(pos)
                fh.flush()
                os.fsync(fh.fileno())
        self.offsets = offsets
        return cut, offsets.count(None)

    # ----------------------------------------------------------------- files

    @property
    def out_dir(self) -> Path:
        """Where the pipeline writes the job's result files."""
        return self.folder / "out"

    @property
    def checkpoint_dir(self) -> Path:
        """Where the pipeline keeps stage checkpoints (the same folder on every resume)."""
        return self.folder / "checkpoints"

    def open_result(self, name: str) -> BinaryIO:
        """Result file ``name`` opened for reading; refused unless it is a listed regular file reached without links."""
        if not isinstance(name, str) or not FILE_NAME_PATTERN.fullmatch(name):
            raise StoreError(f"invalid file name {str(name)[:80]!r}")
        with self.lock:
            files = list(self.state.get("files", []))
        if name not in files:
            raise StoreError(f"job {self.job_id} has no result file {name!r} (files: {', '.join(files) or 'none yet'})")
        return self.open_result_unlisted(name)

    def open_result_unlisted(self, name: str) -> BinaryIO:
        """File ``name`` under out/ opened for reading, if it is a regular file reached without links."""
        if not isinstance(name, str) or not FILE_NAME_PATTERN.fullmatch(name):
            raise StoreError(f"invalid file name {str(name)[:80]!r}")
        try:
            return _open_regular(self.folder, f"out/{name}")
        except OSError:
            raise StoreError(f"result file {name!r} of job {self.job_id} is missing, a link, or outside the job folder") from None

    def input_mesh(self) -> dict[str, np.ndarray]:
        """The submitted input mesh's arrays (empty if none)."""
        out = {}
        for name in self.spec.get("input_arrays", []):
            with _open_regular(self.folder, f"input/{name}.npy") as fh:
                out[name] = np.load(fh, allow_pickle=False)
        return out


def _open_regular(root: Path, rel: str) -> BinaryIO:
    fh = os.fdopen(open_file(root, rel), "rb")
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise OSError(f"{rel} is not a regular file")
    return fh


def _record_at(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(start, length, seq) of an intact record at ``pos``, else None."""
    if pos + _RECORD_HEAD.size > len(data):
        return None
    length, crc = _RECORD_HEAD.unpack_from(data, pos)
    start, end = pos + _RECORD_HEAD.size, pos + _RECORD_HEAD.size + length
    if length == 0 or length > _MAX_RECORD or end > len(data) or data[start] != _RECORD_MAGIC:
        return None
    if zlib.crc32(data[start:end]) != crc:
        return None
    try:
        seq = msgpack.unpackb(data[start:end], raw=False)["seq"]
    except Exception:
        return None
    return (start, length, seq) if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None


def _next_record(data: bytes, pos: int, min_seq: int) -> tuple[int, int, int] | None:
    """The first intact record after ``pos`` whose seq is at least ``min_seq`` (a resync after damage)."""
    magic = bytes([_RECORD_MAGIC])
    i = data.find(magic, pos + _RECORD_HEAD.size)
    while i >= 0:
        found = _record_at(data, i - _RECORD_HEAD.size)
        if found is not None and found[2] >= min_seq:
            return found
        i = data.find(magic, i + 1)
    return None


def _is_torn_tail(data: bytes, pos: int) -> bool:
    """Whether the bytes from ``pos`` look like an append cut short (never acknowledged), not a damaged record."""
    if pos + _RECORD_HEAD.size > len(data):
        return True
    length, _ = _RECORD_HEAD.unpack_from(data, pos)
    return pos + _RECORD_HEAD.size + length > len(data) or not any(data[pos:])


QUARANTINE = "quarantine"
_WHY_SUFFIX = ".why.json"


def _quarantine_message(job_id: str, reason: str, where: Path) -> str:
    return f"job {job_id} is quarantined: {reason}; its files are kept at {where}"


def check_store_root(root: str | os.PathLike) -> Path:
    """The store folder, or StoreError naming the path and the fix; nothing is created here.

    An empty name would silently mean the current folder, and a path through a file fails later
    with a bare ``Not a directory``: both are refused before anything is written.
    """
    fix = "name a folder (it is created if missing), e.g. --store ~/dreamflow-store"
    if not str(root).strip():
        raise StoreError(f"the job store path is empty; {fix}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreError(f"the job store {path} is a file, not a folder; {fix}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"the job store {path} lies under {parent}, which is a file, not a folder; {fix}")
            if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
                raise StoreError(f"the job store {path} cannot be created: {parent} is not writable; {fix}")
            break
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"the job store {path} is not writable; {fix}")
    return path


class JobStore:
    """All jobs under ``root/jobs``; loads existing ones on open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = check_store_root(root)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self.repairs: list[str] = []  # what open() found and fixed (torn logs, unreadable jobs)
        self.quarantined: dict[str, str] = {}  # job id -> why it is not served
        self._open()

    def _open(self) -> None:
        self._recall_quarantine()
        for folder in sorted(self.jobs_dir.iterdir()):
            if not JOB_ID.fullmatch(folder.name):
                continue
            if folder.is_symlink():
                self._refuse(folder.name, "its folder is a symbolic link (not loaded, run or written to)", move=False)
                continue
            if not folder.is_dir():
                continue
            try:
                spec = check_spec(json.loads(read_bytes(folder, "spec.json")))
                state = check_state(json.loads(read_bytes(folder, "state.json")))
            except (OSError, ValueError, RecursionError) as exc:
                self._refuse(folder.name, f"its files are damaged ({str(exc)[:200]})", move=True)
                continue
            job = JobRecord(folder.name, folder, spec, state)
            try:
                cut, lost = job._load_log()
            except OSError as exc:
                self._refuse(folder.name, f"its event log is unreadable ({str(exc)[:200]})", move=True)
                continue
            if cut:
                self.repairs.append(f"job {folder.name}: cut a torn event-log tail of {cut} bytes")
            if lost:
                self.repairs.append(f"job {folder.name}: {lost} damaged event(s) in the middle of the log are lost; "
                                    f"the intact events after them are kept, and their seqs are never reused")
            self._jobs[job.job_id] = job

    def _refuse(self, job_id: str, reason: str, move: bool) -> None:
        """Quarantine one bad job: moved out of jobs/ for inspection, named in ``repairs``; the rest are served."""
        where = self.jobs_dir / job_id
        if move:
            target = self.root / QUARANTINE / job_id
            try:
                target.parent.mkdir(exist_ok=True)
                os.replace(where, target)
                where = target
                # Why, beside the folder (not in it: its files are the evidence), so later starts still say so.
                atomic_write_json(target.parent / f"{job_id}{_WHY_SUFFIX}", {"reason": reason})
            except OSError:
                pass  # left where it is; it is still never loaded
        self.quarantined[job_id] = _quarantine_message(job_id, reason, where)
        self.repairs.append(self.quarantined[job_id])

    def _recall_quarantine(self) -> None:
        """Jobs quarantined at an earlier start stay known as such (``corrupt_job``, with where their files are)."""
        folder = self.root / QUARANTINE
        if not folder.is_dir() or folder.is_symlink():
            return
        for entry in sorted(folder.iterdir()):
            if not JOB_ID.fullmatch(entry.name):
                continue
            try:
                reason = str(json.loads((folder / f"{entry.name}{_WHY_SUFFIX}").read_text())["reason"])[:300]
            except (OSError, ValueError, KeyError, TypeError):
                reason = "its files were found damaged at an earlier start"
            self.quarantined[entry.name] = _quarantine_message(entry.name, reason, entry)

    def create(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> JobRecord:
        """A new queued job with its spec and input arrays on disk."""
        job_id = new_id()
        folder = self.jobs_dir / job_id
        folder.mkdir()  # a fresh folder, never one that is already there (or a link placed there)
        make_dirs(self.jobs_dir, job_id, "input")
        for sub in ("events", "checkpoints", "out"):
            make_dirs(folder, sub)
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
        if isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id) and not JOB_ID.fullmatch(job_id):
            raise StoreError(f"unknown job {job_id}", code="unknown_job")  # a well-formed id no job of this store has
        check_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            if job_id in self.quarantined:
                raise StoreError(self.quarantined[job_id], code="corrupt_job")
            raise StoreError(f"unknown job {job_id}", code="unknown_job")
        return job

    def all(self) -> list[JobRecord]:
        """Every job, oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        return sorted(jobs, key=lambda j: (j.state.get("created", 0), j.job_id))

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
