"""Links and damaged files in the store, vanished peers, the memory bound, big uploads (issue 17: 2, 5-8)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from server_runners import StepRunner, StepResult
from server_support import collect

from dreamflow.server import JobStore, StoreError
from dreamflow_protocol import Message, RequestError, decode, encode


def _job(store: JobStore, prompt: str = "x") -> str:
    return store.create({"prompt": prompt, "preset": "smoke", "method": "apfo"}, {}).job_id


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "victim.txt").write_text("precious")
    return outside


# ------------------------------------------------------------------------------------------ links


def test_a_job_folder_that_is_a_link_is_refused_and_nothing_outside_changes(tmp_path, make_server, make_client):
    store = JobStore(tmp_path / "store")
    real = store.get(_job(store))
    elsewhere = tmp_path / "elsewhere"
    real.folder.rename(elsewhere)
    (store.jobs_dir / real.job_id).symlink_to(elsewhere, target_is_directory=True)
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    runner = StepRunner(steps=1)
    srv = make_server(runner, store=tmp_path / "store")
    assert srv.server.store.all() == [] and runner.calls == []
    assert any("symbolic link" in r for r in srv.server.store.repairs)
    with pytest.raises(RequestError) as info:
        make_client(srv.endpoint).status(real.job_id)
    assert info.value.code == "corrupt_job" and "symbolic link" in str(info.value)
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before


def test_an_out_folder_linked_outside_is_not_served(tmp_path):
    outside = _outside(tmp_path)
    store = JobStore(tmp_path / "store")
    job = store.get(_job(store))
    (job.folder / "out").rmdir()
    (job.folder / "out").symlink_to(outside, target_is_directory=True)
    job.save_state(state="done", files=["victim.txt"])
    with pytest.raises(StoreError, match="a link"):
        job.open_result("victim.txt")


def test_links_at_temporary_and_target_names_are_never_written_through(tmp_path):
    from dreamflow.safe_files import LinkRefused, atomic_write

    outside = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.json.tmp", ".report.json.tmp", "stage1.pt.tmp"):  # the names older code wrote through
        (out / name).symlink_to(outside / "victim.txt")
    (out / "report.json").symlink_to(outside / "victim.txt")
    atomic_write(out / "report.json", b"{}")
    assert (outside / "victim.txt").read_text() == "precious"
    assert not (out / "report.json").is_symlink() and (out / "report.json").read_bytes() == b"{}"
    (tmp_path / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LinkRefused):  # in the store (strict) a linked folder is refused too
        atomic_write(tmp_path / "linked" / "victim.txt", b"overwritten", strict=True)
    assert (outside / "victim.txt").read_text() == "precious"
    atomic_write(tmp_path / "linked" / "new.txt", b"ok")  # a user's own output folder may be a link
    assert (outside / "new.txt").read_bytes() == b"ok"


def test_a_checkpoint_that_is_a_link_is_not_loaded_and_not_written_through(tmp_path):
    import torch

    from dreamflow.events import JobControl
    from dreamflow.pipeline.config import build_config
    from dreamflow.pipeline.context import JobContext

    outside = tmp_path / "outside.pt"
    torch.save({"secret": 1}, outside)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "stage1.pt").symlink_to(outside)
    (ckpt / "stage1.pt.tmp").symlink_to(outside)
    logs = []
    sink = type("Sink", (), {"emit": lambda self, kind, fields, arrays=None: logs.append(fields)})()
    ctx = JobContext(build_config("smoke"), tmp_path / "out", sink, JobControl(), torch.device("cpu"), checkpoint_dir=ckpt)
    assert ctx.load_checkpoint("stage1") is None and "unreadable" in logs[0]["message"]
    ctx.save_checkpoint("stage1", {"step": 3})
    assert torch.load(outside) == {"secret": 1}
    assert torch.load(ckpt / "stage1.pt") == {"step": 3}


def test_a_job_whose_out_folder_became_a_link_fails_without_writing_outside(tmp_path, make_server, make_client):
    outside = _outside(tmp_path)
    store = JobStore(tmp_path / "store")
    job = store.get(_job(store))
    (job.folder / "out").rmdir()
    (job.folder / "out").symlink_to(outside, target_is_directory=True)
    runner = StepRunner(steps=1)
    srv = make_server(runner, store=tmp_path / "store")
    client = make_client(srv.endpoint)
    client.subscribe(job.job_id, 0)
    events = collect(client, job.job_id)
    assert events[-1].type == "error" and "out folder is a symbolic link" in events[-1].fields["message"]
    assert runner.calls == [] and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


# --------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("name, content", [("state.json", "[]"), ("state.json", '{"state": "queued", "created": "yesterday"}'),
                                           ("spec.json", "[]"), ("spec.json", '{"prompt": 7}')])
def test_a_damaged_job_file_quarantines_that_job_and_the_server_serves_the_rest(tmp_path, make_server, make_client, name,
                                                                                 content):
    store = JobStore(tmp_path / "store")
    bad, good = _job(store, "bad"), _job(store, "good")
    (store.jobs_dir / bad / name).write_text(content)
    srv = make_server(StepRunner(steps=1), store=tmp_path / "store")
    client = make_client(srv.endpoint)
    assert [j["job"] for j in client.list_jobs()] == [good]
    client.subscribe(good, 0)
    assert collect(client, good)[-1].type == "job_done"
    with pytest.raises(RequestError) as info:
        client.status(bad)
    assert info.value.code == "corrupt_job" and "quarantined" in str(info.value) and name in str(info.value)
    assert (tmp_path / "store" / "quarantine" / bad / name).read_text() == content  # kept for inspection


def test_a_quarantined_job_is_still_answered_corrupt_job_with_its_files_at_every_later_start(tmp_path, make_server,
                                                                                              make_client):
    store = JobStore(tmp_path / "store")
    bad = _job(store, "bad")
    (store.jobs_dir / bad / "spec.json").write_text("[]")
    first = JobStore(tmp_path / "store")
    assert bad in first.quarantined and any(bad in r for r in first.repairs)
    kept = tmp_path / "store" / "quarantine" / bad
    for _ in range(2):  # the second and third starts: nothing left to repair, the job still known
        srv = make_server(StepRunner(steps=1), store=tmp_path / "store")
        assert not any(bad in r for r in srv.server.store.repairs)
        with pytest.raises(RequestError) as info:
            make_client(srv.endpoint).status(bad)
        assert info.value.code == "corrupt_job"
        assert "damaged" in str(info.value) and str(kept) in str(info.value)
        srv.stop()
    assert (kept / "spec.json").read_text() == "[]"


def test_a_quarantine_reason_lost_still_answers_corrupt_job(tmp_path):
    store = JobStore(tmp_path / "store")
    bad = _job(store, "bad")
    (store.jobs_dir / bad / "state.json").write_text("[]")
    JobStore(tmp_path / "store")
    for why in (tmp_path / "store" / "quarantine").glob("*.why.json"):
        why.write_text("{not json")
    with pytest.raises(StoreError, match="earlier start") as info:
        JobStore(tmp_path / "store").get(bad)
    assert info.value.code == "corrupt_job"


@pytest.mark.parametrize("where", ["", "  ", "a-file", "a-file/store", "a-file/deeper/store"])
def test_an_unusable_store_path_is_refused_with_the_path_and_the_fix_and_nothing_is_created(tmp_path, monkeypatch,
                                                                                            where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError) as info:
        JobStore(where)
    message = str(info.value)
    assert "\n" not in message and "--store" in message
    assert ("empty" in message) if not where.strip() else ("a-file" in message and "not a folder" in message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dreamflow_serve_refuses_an_empty_store_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dreamflow", "serve", "--store", "", "--bind", "tcp://127.0.0.1:0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "job store path is empty" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_flipped_byte_mid_log_keeps_the_events_after_it_and_never_reuses_a_seq(tmp_path):
    store = JobStore(tmp_path / "store")
    job = store.get(_job(store))
    for i in range(6):
        job.append_event(Message("log", {"level": "info", "message": f"event {i}"}, job=job.job_id, seq=0))
    ids = [job.read_event(i).id for i in range(6)]
    log = job.folder / "events.log"
    data = bytearray(log.read_bytes())
    start, length = job.offsets[2]
    data[start + length // 2] ^= 0x40  # one flipped bit inside event 2
    log.write_bytes(bytes(data))
    reopened = JobStore(tmp_path / "store")
    again = reopened.get(job.job_id)
    assert again.next_seq == 6 and any("damaged event" in r for r in reopened.repairs)
    assert [again.read_event(i).id for i in (0, 1, 3, 4, 5)] == [ids[i] for i in (0, 1, 3, 4, 5)]
    with pytest.raises(StoreError, match="damaged on disk"):
        again.read_event(2)
    assert again.append_event(Message("log", {"level": "info", "message": "new"}, job=job.job_id, seq=0)).seq == 6
    assert JobStore(tmp_path / "store").get(job.job_id).next_seq == 7
    # A torn tail (an append cut short) is still cut, and only it.
    with open(log, "ab") as fh:
        fh.write(b"\x40\x00\x00\x00\x12")
    assert JobStore(tmp_path / "store").get(job.job_id).next_seq == 7


def test_the_client_says_so_when_the_server_has_fewer_events_than_it_asks_for(make_server, make_client):
    srv = make_server(StepRunner(steps=2))
    client = make_client(srv.endpoint)
    job = client.submit("x", preset="smoke")
    n = len(collect(client, job))
    with pytest.raises(RequestError) as info:
        client.subscribe(job, n + 5)
    assert info.value.code == "seq_mismatch" and f"next_seq {n}" in str(info.value)
    mismatch = client.next_event(timeout=10)  # the event stream says so too, instead of waiting forever
    assert mismatch is not None and mismatch.type == "error" and mismatch.fields["code"] == "seq_mismatch"


# ------------------------------------------------------------------------------ peers and memory


def test_subscriptions_of_silent_peers_expire_and_a_turn_visits_only_active_ones(make_server, make_client):
    runner = StepRunner(steps=200, step_seconds=0.05)
    srv = make_server(runner, peer_timeout=0.5)
    client = make_client(srv.endpoint)
    running = client.submit("busy", preset="smoke", subscribe=False)
    queued = client.submit("waits", preset="smoke", subscribe=False)
    ctx = zmq.Context.instance()
    for _ in range(40):  # peers that subscribe to a queued job, then vanish without a word
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.endpoint)
        sock.send_multipart(encode(Message("subscribe", {"from_seq": 0}, job=queued)), copy=False)
        assert decode(sock.recv_multipart()).type == "subscribed"
        sock.close()
    subs = srv.server._subs
    assert len(subs) >= 40 and not any(key[1] == queued for key in subs.waiting)  # up to date: not the pump's work
    deadline = time.monotonic() + 30
    while len(subs) and time.monotonic() < deadline:
        client.ping()
        time.sleep(0.1)
    assert len(subs) == 0
    client.cancel(running)
    client.cancel(queued)


class BigResultRunner:
    """A job whose result file is ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, config, out_dir, sink, control, **_):
        Path(out_dir, "big.bin").write_bytes(np.random.default_rng(0).integers(0, 255, self.size, np.uint8).tobytes())
        return StepResult({"big": "big.bin"}, {})


def test_queued_reply_bytes_are_bounded_across_peers_and_a_refused_reply_is_answered(make_server, make_client):
    size = 24 * 1024 * 1024
    srv = make_server(BigResultRunner(size), max_queued_bytes=8 * 1024 * 1024)
    client = make_client(srv.endpoint, timeout=60)
    job = client.submit("big", preset="smoke")
    assert collect(client, job)[-1].type == "job_done"
    ctx = zmq.Context.instance()
    slow = ctx.socket(zmq.DEALER)  # a peer that asks for the big file and does not read it
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.connect(srv.endpoint)
    slow.send_multipart(encode(Message("fetch", job=job)), copy=False)
    deadline = time.monotonic() + 30
    while srv.server._queued_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.server._queued_bytes >= size  # one large reply is always let through
    with pytest.raises(RequestError) as info:
        client.fetch(job)
    assert info.value.code == "overloaded" and "8 MiB" in str(info.value)
    assert srv.server._queued_bytes <= size + 8 * 1024 * 1024
    assert decode(slow.recv_multipart(copy=False)[0:]).type == "result"  # the slow peer reads at last
    slow.close()
    deadline = time.monotonic() + 30
    while srv.server._queued_bytes and time.monotonic() < deadline:
        client.ping()
    assert len(client.fetch(job)["big.bin"]) == size


def test_a_reply_zeromq_refuses_is_answered_later_with_reply_dropped(make_server, make_client):
    srv = make_server()
    client = make_client(srv.endpoint)
    server = srv.server
    real = server._try_send
    refused = []

    def full_once(sock, peer, frames):
        header = decode(frames).type if not refused else None
        if header == "status_reply":
            refused.append(header)
            return "full"
        return real(sock, peer, frames)

    server._try_send = full_once
    with pytest.raises(RequestError) as info:
        client.status()
    assert refused and info.value.code == "reply_dropped" and "status request" in str(info.value)
    assert client.status()["server_id"] == server.server_id


def test_a_big_upload_is_checked_and_stored_off_the_socket_thread(make_server, make_client, monkeypatch):
    import dreamflow_protocol.schema as schema

    srv = make_server(StepRunner(steps=1))
    client = make_client(srv.endpoint, timeout=60)
    checking, release = threading.Event(), threading.Event()
    real_check = schema.check_mesh_arrays

    def slow_check(*args, **kw):
        if threading.current_thread().name.startswith("dreamflow-intake"):
            checking.set()
            release.wait(60)
        return real_check(*args, **kw)

    monkeypatch.setattr(schema, "check_mesh_arrays", slow_check)
    n = 1 << 20
    vertices = np.random.default_rng(0).random((n, 3), dtype=np.float32)
    faces = np.arange(3 * (n // 3), dtype=np.int32).reshape(-1, 3)
    result: dict = {}
    submitter = threading.Thread(target=lambda: result.setdefault("job", client.submit(
        "x", preset="smoke", mesh={"vertices": vertices, "faces": faces}, start_stage="texture", subscribe=False)))
    submitter.start()
    assert checking.wait(60)
    other = make_client(srv.endpoint)
    other.ping()  # answered while the upload's check is still in progress
    assert other.status()["jobs"] == 0 and "job" not in result
    release.set()
    submitter.join(60)
    assert len(result["job"]) == 32
