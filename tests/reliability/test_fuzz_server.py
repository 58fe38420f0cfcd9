"""The live server under fuzzed and hostile requests, as a real ``dreamflow serve`` process.

Every request gets exactly one answer; a malformed one gets an ``error`` whose message is the very
problem the decoder names for those bytes; the process never dies; its resident memory settles
instead of growing with the number of bad requests.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from reliability_helpers import (JOB, RawPeer, cube_arrays, frames_of, fuzz, header, mutated_frames, pack, rss_bytes, serve,
                                 stop)

from dreamflow.server import JobStore
from dreamflow_protocol import Message, ProtocolError, decode, encode
from dreamflow_protocol.schema import REQUEST_TYPES

LIVE_CASES = 1500
REPLY_TYPES = {"capabilities", "accepted", "status_reply", "jobs", "subscribed", "result", "pong", "busy", "error"}


def finished_job(store: Path) -> str:
    """A done job in a fresh store (events and a result file), as the server left it."""
    jobs = JobStore(store)
    job = jobs.create({"prompt": "a done job", "preset": "smoke", "method": "apfo"}, {})
    job.append_event(Message("progress", {"stage": "stage1", "step": 1, "total": 1, "loss": 0.1}, job=job.job_id, seq=0))
    job.append_event(Message("mesh", {"stage": "stage1", "step": 1, "final": True}, cube_arrays(), job=job.job_id, seq=0))
    (job.out_dir / "model.glb").write_bytes(b"glTF" + bytes(100))
    job.append_event(Message("job_done", {"files": ["model.glb"]}, job=job.job_id, seq=0))
    job.save_state(state="done", files=["model.glb"])
    return job.job_id


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server process whose queue takes no jobs (a valid submit is answered busy), with one finished job."""
    store = tmp_path_factory.mktemp("fuzz") / "store"
    stale = finished_job(store)
    JobStore(store).get(stale).save_state(finished=time.time() - 40 * 86400)  # past --keep-days
    job = finished_job(store)
    proc, endpoint = serve(store, "--max-queue", "0", "--max-frame-mb", "1", "--log-level", "warning", "--keep-days", "30",
                           "--keep-jobs", "5")
    yield proc, endpoint, job, stale
    err = stop(proc)
    assert proc.returncode == 0, err


def request_seeds(job: str) -> list[list[bytes]]:
    """Valid requests (some aimed at the real job, some at an unknown one) and hostile ones, as frames."""
    mesh = cube_arrays()
    nan_mesh = dict(mesh, vertices=np.where(np.arange(24).reshape(8, 3) == 4, np.nan, mesh["vertices"]).astype(np.float32))
    msgs = [Message("hello", {"client": "fuzz"}), Message("ping", {"t": 1.0}), Message("status"),
            Message("list_jobs", {"limit": 3}), Message("status", job=job), Message("subscribe", {"from_seq": 1}, job=job),
            Message("fetch", {"names": ["model.glb"]}, job=job),
            Message("cancel", {"reason": "x"}, job=job), Message("unsubscribe", job=job), Message("status", job=JOB),
            Message("submit", {"prompt": "a chair", "preset": "smoke"}), Message("submit", {"prompt": "p"}, mesh)]
    seeds = [frames_of(m) for m in msgs]
    seeds.append([bytes(f) for f in encode(Message("submit", {"prompt": "nan"}, nan_mesh), validate=False)])
    seeds.append([pack(header(v=7))])
    return seeds


def expected_error(frames: list[bytes]) -> str | None:
    """What the decoder says is wrong with these frames (None if they decode)."""
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        return str(exc)
    return None if msg.type in REQUEST_TYPES else f"{msg.type} is a message a server sends, not a request"


def test_fuzzed_requests_each_get_one_answer_naming_the_problem(live):
    proc, endpoint, job, _ = live
    peer = RawPeer(endpoint)
    ran = [0]

    @fuzz(LIVE_CASES)
    @given(st.one_of(mutated_frames(request_seeds(job)), st.lists(st.binary(max_size=64), min_size=1, max_size=3)))
    def prop(frames):
        ran[0] += 1
        want = expected_error(frames)
        reply = peer.ask(frames, timeout=15)
        assert reply.type in REPLY_TYPES
        if want is not None:
            assert reply.type == "error" and reply.fields["message"] == want[:4096], (reply.fields, want)
        elif reply.type == "error":
            assert reply.fields["message"] and reply.fields["code"] in {"unknown_job", "bad_request"}, reply.fields

    try:
        prop()
    finally:
        peer.close()
    assert ran[0] >= LIVE_CASES
    assert proc.poll() is None, "the server died"


def test_named_errors_for_nan_meshes_versions_unknown_jobs_and_traversal(live):
    proc, endpoint, job, _ = live
    peer = RawPeer(endpoint)
    try:
        nan = cube_arrays()
        nan["vertices"] = nan["vertices"].copy()
        nan["vertices"][3, 1] = np.inf
        submit = Message("submit", {"prompt": "p"}, nan)
        reply = peer.ask(encode(submit, validate=False), submit.id)
        assert reply.type == "error" and "vertices have NaN or infinite coordinates" in reply.fields["message"]
        h = header(v=2)
        assert "protocol version 2 is not supported" in peer.ask([pack(h)], h["id"]).fields["message"]
        for mtype in ("status", "subscribe", "cancel", "fetch", "unsubscribe"):
            for unknown in ("0" * 32, "0" * 16):  # well-formed ids (8-64 hex digits) of no job
                msg = Message(mtype, job=unknown)
                reply = peer.ask(encode(msg), msg.id)
                assert reply.type == "error" and reply.fields["message"] == f"unknown job {unknown}", reply.fields
                assert reply.fields["code"] == "unknown_job"
        for bad_id in ("../" + job, job + "/../..", job.upper()):
            for mtype in ("status", "subscribe", "cancel", "fetch"):
                h = header(type=mtype, job=bad_id)
                reply = peer.ask([pack(h)], h["id"])
                assert reply.type == "error" and ("job id must be" in reply.fields["message"]
                                                  or reply.fields["message"].startswith("invalid job id")), reply.fields
        for name in ("../spec.json", "/etc/passwd", "out/../../state.json", "..", "a/../../b"):
            h = header(type="fetch", job=job, fields={"names": [name]})
            reply = peer.ask([pack(h)], h["id"])
            assert reply.type == "error" and "not in the expected form" in reply.fields["message"], reply.fields
        ok = Message("fetch", {"names": ["model.glb"]}, job=job)
        assert peer.ask(encode(ok), ok.id).arrays["model.glb"].tobytes()[:4] == b"glTF"
    finally:
        peer.close()


def _hostile_batch(job: str, i: int) -> list[list]:
    """A mix of bad requests, each a different way to be wrong; big frames included."""
    h = header(type="submit", fields={"prompt": "p"},
               buffers=[{"name": "vertices", "dtype": "float32", "shape": [2**40, 3]},
                        {"name": "faces", "dtype": "int32", "shape": [1, 3]}])
    return [
        [pack(header())[: 5 + i % 20]],                                    # truncated msgpack
        [pack(header(v=i + 2))],                                           # wrong version
        [pack(header(type="status", job=f"{i:032x}"))],                    # unknown job
        [pack(header(fields={f"k{i}": "x" * 1000}))],                      # unknown field, long value
        [pack(h), b"\0" * 12, b"\0" * 12],                                 # a huge declared size
        [pack(header(type="submit", fields={"prompt": "p"},
                     buffers=[{"name": "vertices", "dtype": "float32", "shape": [87382, 3]}])),
         b"\0" * (87382 * 12)],                                            # a frame just over the 1 MiB limit
        [b"\x91" * 2000 + b"\xc0"],                                         # deep nesting
        [pack(header(type="subscribe", job=job, fields={"from_seq": 0}))],  # a valid replay to a peer that then vanishes
    ]


def test_memory_settles_under_thousands_of_bad_requests_and_vanishing_peers(live):
    proc, endpoint, job, _ = live
    ctx = zmq.Context.instance()

    def round_of(n: int) -> int:
        sent = 0
        peer = RawPeer(endpoint, ctx)
        try:
            for i in range(n):
                for frames in _hostile_batch(job, i):
                    reply = peer.ask(frames, timeout=15)
                    assert reply.type in ("error", "subscribed")
                    sent += 1
        finally:
            peer.close()  # leaves mid-replay: the server must forget it
        for _ in range(n // 4):
            gone = RawPeer(endpoint, ctx)
            msg = Message("subscribe", {"from_seq": 0}, job=job)
            gone.sock.send_multipart(encode(msg))
            gone.close()
        return sent

    round_of(60)  # warm-up: allocator pools, code paths, caches
    time.sleep(0.3)
    before = rss_bytes(proc.pid)
    sent = sum(round_of(60) for _ in range(4))
    time.sleep(0.3)
    after = rss_bytes(proc.pid)
    print(f"server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB over {sent} bad requests")
    assert sent >= 1900 and proc.poll() is None
    # Each round pushes over 60 MiB of oversized frames through the server; what stays must not grow with it.
    assert after - before < 24 * 1024 * 1024, f"server RSS grew by {(after - before) / 2**20:.1f} MiB over {sent} bad requests"
    with _Pinger(endpoint) as pinger:
        assert pinger.rtt() < 1.0


class _Pinger:
    def __init__(self, endpoint: str) -> None:
        self.peer = RawPeer(endpoint)

    def __enter__(self) -> "_Pinger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.peer.close()

    def rtt(self) -> float:
        msg = Message("ping", {"t": 0.0})
        start = time.perf_counter()
        assert self.peer.ask(encode(msg), msg.id).type == "pong"
        return time.perf_counter() - start


def test_the_serve_command_applies_its_retention_flags_at_start(live):
    proc, endpoint, job, stale = live
    store_jobs = Path(proc.args[proc.args.index("--store") + 1]) / "jobs"
    peer = RawPeer(endpoint)
    try:
        gone = Message("status", job=stale)
        assert peer.ask(encode(gone), gone.id).fields["message"] == f"unknown job {stale}"
        kept = Message("status", job=job)
        assert peer.ask(encode(kept), kept.id).fields["job_status"]["state"] == "done"
    finally:
        peer.close()
    deadline = time.monotonic() + 10
    while (store_jobs / stale).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (store_jobs / stale).exists() and (store_jobs / job).is_dir()
