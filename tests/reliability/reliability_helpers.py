"""Shared pieces of the reliability suite: valid sample messages of every type, frame mutations,
a ``dreamflow serve`` subprocess, and reading a process's resident memory.

Named uniquely, and no conftest.py in this folder: other folders' tests do ``from server_support import``,
which a second conftest.py loaded in the same run could shadow. Test modules import the fixtures
below by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dreamflow.server import Server
from dreamflow_protocol import PROTOCOL_VERSION, Client, Message, decode, encode, new_id

JOB = "ab" * 16

#: The smallest real job: reference prior, stage 1 only, tiny renders and export.
TINY_REAL_JOB = {"prior.kind": "reference", "stage1.steps": 8, "stage1.resolution": 16, "stage1.samples_per_ray": 8,
                 "stage1.preview_every": 0, "stage1.mesh_every": 0, "stage1.mesh_resolution": 16, "export.texture_size": 16,
                 "export.face_budget": 300, "export.view_resolution": 32, "geometry.enabled": False,
                 "texture.enabled": False, "refine.enabled": False, "checkpoint_every": 2}


def cube_arrays() -> dict[str, np.ndarray]:
    """A valid small mesh (vertices, faces, normals, uvs, texture)."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5]], np.int32)
    return {"vertices": v, "faces": f, "normals": v / np.linalg.norm(v, axis=1, keepdims=True),
            "uvs": (v[:, :2] * 0.5 + 0.5).astype(np.float32), "texture": np.full((4, 4, 3), 9, np.uint8)}


def sample_messages() -> list[Message]:
    """One valid message of every type the protocol knows (requests and server messages)."""
    mesh = cube_arrays()
    return [
        Message("hello", {"client": "fuzz", "client_version": "1"}),
        Message("capabilities", {"protocol": 1, "server_version": "0", "server_id": "s", "device": "cpu",
                                 "accelerators": {"cuda": False}, "presets": ["smoke"], "methods": ["apfo"],
                                 "start_stages": ["texture"], "limits": {"max_depth": 8}, "max_queue": 8, "auth": "none"}),
        Message("submit", {"prompt": "a chair", "negative_prompt": "blurry", "seed": 3, "method": "apfo", "preset": "smoke",
                           "overrides": {"stage1.steps": 2, "export.texture_size": 64}, "object_id": "Cube"}),
        Message("submit", {"prompt": "refine", "start_stage": "texture", "start_t": 0.3}, dict(mesh)),
        Message("accepted", {"position": 0, "state": "queued"}, job=JOB),
        Message("progress", {"stage": "stage1", "step": 3, "total": 9, "loss": 0.5, "eta": 2.0}, job=JOB, seq=4),
        Message("preview", {"stage": "stage1", "step": 3}, {"image": np.zeros((4, 4, 3), np.uint8)}, job=JOB, seq=5),
        Message("mesh", {"stage": "stage1", "step": 3, "final": False, "object_id": None}, dict(mesh), job=JOB, seq=6),
        Message("stage_done", {"stage": "stage1", "steps": 9, "seconds": 1.5, "report": {"psnr": 20.0}}, job=JOB, seq=7),
        Message("job_done", {"files": ["model.glb", "report.json"], "seconds": 3.0}, job=JOB, seq=8),
        Message("error", {"message": "bad", "code": "bad_field", "field": "prompt"}),
        Message("cancel", {"reason": "user"}, job=JOB),
        Message("cancelled", {"reason": "user"}, job=JOB, seq=9),
        Message("status", {}, job=JOB),
        Message("status", {}),
        Message("status_reply", {"job_status": {"job": JOB, "state": "done"}}),
        Message("list_jobs", {"limit": 5, "state": "done"}),
        Message("jobs", {"jobs": [{"job": JOB}]}),
        Message("subscribe", {"from_seq": 2}, job=JOB),
        Message("subscribed", {"from_seq": 0, "next_seq": 3, "state": "running"}, job=JOB),
        Message("unsubscribe", {}, job=JOB),
        Message("fetch", {"names": ["model.glb"]}, job=JOB),
        Message("result", {"files": ["model.glb"]}, {"model.glb": np.frombuffer(b"glTF1234", np.uint8)}, job=JOB),
        Message("ping", {"t": 1.0}),
        Message("pong", {"t": 1.0, "server_time": 2.0, "server_id": "s"}),
        Message("busy", {"message": "full", "queued": 8, "max_queue": 8}),
        Message("log", {"level": "info", "message": "hi", "stage": "stage1"}, job=JOB, seq=10),
    ]


def frames_of(msg: Message) -> list[bytes]:
    """The message's frames as independent bytes objects."""
    return [bytes(f) for f in encode(msg)]


SAMPLE_FRAMES: list[list[bytes]] = [frames_of(m) for m in sample_messages()]


def header(**changes: Any) -> dict:
    """A valid ping header, with ``changes`` applied."""
    h = {"v": PROTOCOL_VERSION, "type": "ping", "id": new_id(), "job": None, "seq": None, "parent": None, "fields": {},
         "buffers": []}
    h.update(changes)
    return h


def pack(h: Any) -> bytes:
    """msgpack bytes of a header (or anything)."""
    return msgpack.packb(h, use_bin_type=True)


# ------------------------------------------------------------------------------ mutations

def fuzz(n: int) -> settings:
    """Reproducible settings: derandomised, no deadline (the machine is shared), no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])



@st.composite
def mutated_frames(draw: st.DrawFn, seeds: list[list[bytes]] = SAMPLE_FRAMES) -> list[bytes]:
    """A valid message's frames after 1-4 random edits: bit flips, truncation, insertion, frame drops."""
    frames = [bytearray(f) for f in draw(st.sampled_from(seeds))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "set", "drop_frame", "dup_frame", "random_frame")))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if not frames:
            frames.append(bytearray(draw(st.binary(max_size=64))))
            continue
        f = frames[i]
        if op == "flip" and f:
            pos = draw(st.integers(0, len(f) - 1))
            f[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del f[draw(st.integers(0, len(f))):]
        elif op == "insert":
            pos = draw(st.integers(0, len(f)))
            f[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and f:
            a = draw(st.integers(0, len(f) - 1))
            del f[a:a + draw(st.integers(1, 8))]
        elif op == "set" and f:
            f[draw(st.integers(0, len(f) - 1))] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDF, 0xFF)))
        elif op == "drop_frame" and len(frames) > 1:
            del frames[i]
        elif op == "dup_frame":
            frames.insert(i, bytearray(f))
        elif op == "random_frame":
            frames[i] = bytearray(draw(st.binary(max_size=256)))
    return [bytes(f) for f in frames]


# ------------------------------------------------------------------------------ processes

def serve(store: Path, *extra: str, bind: str = "tcp://127.0.0.1:*", env: dict | None = None,
          stderr: Any = subprocess.PIPE) -> tuple[subprocess.Popen, str]:
    """Start ``dreamflow serve`` (on a free loopback port by default); the process and its endpoint.

    A port just freed by a killed server is retried for a few seconds (the kernel may hold it briefly).
    """
    environ = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "dreamflow", "serve", "--bind", bind, "--store", str(store), *extra],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=environ)
        line = proc.stdout.readline()
        if "listening on " in line:
            return proc, line.split("listening on ")[1].split()[0]
        proc.kill()
        err = proc.communicate()[1] or ""
        if "Address already in use" not in err or attempt == 9:
            raise AssertionError(f"server did not start: {line}{err}")
        time.sleep(0.5)
    raise AssertionError("unreachable")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    """Stop a server process (SIGTERM: cleanly; SIGKILL: a crash); its stderr."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RawPeer:
    """A bare DEALER socket: sends any frames, receives the reply to one request by its parent id."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None, curve: tuple[bytes, bytes, bytes] | None = None):
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)

    def ask(self, frames: list, parent: str | None | type = Any, timeout: float = 10.0) -> Message:
        """Send frames; the first reply (not a job event) whose parent is ``parent`` (``Any``: whatever it is)."""
        self.sock.send_multipart(frames, copy=False)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise TimeoutError(f"no reply within {timeout} s")
            reply = decode(self.sock.recv_multipart(copy=False))
            if reply.seq is None and (parent is Any or reply.parent == parent):
                return reply

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)


# In-process servers, clients and event collection are shared with the server suite.
from server_support import RunningServer, collect  # noqa: E402,F401
