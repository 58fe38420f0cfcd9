"""The job server over real loopback sockets: jobs, streams, fetch, cancel, queue, resume, errors."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
from server_support import collect
from server_runners import StepRunner, cube_mesh

from dreamflow.server import JobStore, Server, ServerConfigError
from dreamflow_protocol import is_local_endpoint
from dreamflow_protocol import ConnectionTimeout, ProtocolError, RequestError, ServerBusy


def test_submit_streams_every_event_in_order_and_results_can_be_fetched(make_server, make_client):
    runner = StepRunner(steps=6)
    srv = make_server(runner=runner)
    client = make_client(srv.endpoint)
    job = client.submit("a red cube", preset="smoke", seed=7, method="sds", overrides={"stage1.steps": 3},
                        object_id="Cube.001")
    events = collect(client, job)
    assert [m.seq for m in events] == list(range(len(events)))
    types = [m.type for m in events]
    assert types[-1] == "job_done" and types.count("progress") == 6 and "stage_done" in types
    meshes = [m for m in events if m.type == "mesh"]
    assert meshes and all(m.fields["object_id"] == "Cube.001" for m in meshes)
    np.testing.assert_array_equal(meshes[0].arrays["vertices"], cube_mesh(3.0)["vertices"])
    assert meshes[0].arrays["faces"].dtype == np.int32 and meshes[0].arrays["texture"].shape == (8, 8, 3)
    previews = [m for m in events if m.type == "preview"]
    assert previews[0].arrays["image"].shape == (8, 8, 3)
    # The spec reached the runner through build_config.
    assert runner.calls[0]["prompt"] == "a red cube" and runner.calls[0]["seed"] == 7 and runner.calls[0]["method"] == "sds"
    files = client.fetch(job)
    out = srv.server.store.get(job).out_dir
    assert set(files) == {"model.glb", "report.json"} == set(events[-1].fields["files"])
    assert files["model.glb"].tobytes() == (out / "model.glb").read_bytes()
    status = client.status(job)
    assert status["state"] == "done" and status["next_seq"] == len(events)


def test_ping_is_answered_quickly_while_a_job_computes(make_server, make_client):
    runner = StepRunner(steps=40, step_seconds=0.05)
    srv = make_server(runner=runner)
    client = make_client(srv.endpoint)
    job = client.submit("busy", preset="smoke")
    assert runner.started.wait(20)
    rtts = []
    for _ in range(25):
        rtts.append(client.ping())
        time.sleep(0.01)
    assert client.status(job)["state"] == "running"  # the pings really overlapped the job
    rtts.sort()
    assert statistics.median(rtts) < 0.05 and rtts[int(0.9 * len(rtts))] < 0.1, rtts
    client.cancel(job)


def test_cancel_stops_a_running_job_within_one_step(make_server, make_client):
    runner = StepRunner(steps=200, step_seconds=0.1)
    srv = make_server(runner=runner)
    client = make_client(srv.endpoint)
    job = client.submit("long", preset="smoke")
    collect(client, job, stop=lambda m: m.type == "progress")
    summary = client.cancel(job, reason="user pressed cancel")
    # The worker may finish cancelling before the reply is built (a loaded machine): both are right.
    assert summary["state"] in ("cancelling", "cancelled")
    events = collect(client, job)
    assert events[-1].type == "cancelled" and events[-1].fields["reason"] == "user pressed cancel"
    # At most the step that was computing when the cancel arrived finishes: counted in steps, not
    # seconds, so that no machine's load can fail it.
    final = client.status(job)
    assert final["state"] == "cancelled" and final["step"] <= summary["step"] + 1, (summary["step"], final["step"])
    assert final["step"] < runner.steps
    with pytest.raises(RequestError, match="no results to fetch: it is cancelled"):
        client.fetch(job)


def test_queue_limit_answers_busy_and_queued_jobs_can_be_cancelled(make_server, make_client):
    runner = StepRunner(steps=200, step_seconds=0.05)
    srv = make_server(runner=runner, max_queue=1)
    client = make_client(srv.endpoint)
    first = client.submit("one", preset="smoke")
    assert runner.started.wait(20)
    second = client.submit("two", preset="smoke")
    assert client.status(second)["position"] == 0
    with pytest.raises(ServerBusy, match="queue is full"):
        client.submit("three", preset="smoke")
    client.cancel(second)
    assert collect(client, second)[-1].type == "cancelled"
    client.cancel(first)
    assert collect(client, first)[-1].type == "cancelled"
    assert len(runner.calls) == 1  # the cancelled queued job never ran


def test_two_clients_see_the_same_stream_and_a_late_subscriber_gets_it_all(make_server, make_client):
    srv = make_server(runner=StepRunner(steps=8, step_seconds=0.03))
    a = make_client(srv.endpoint)
    b = make_client(srv.endpoint)
    job = a.submit("shared", preset="smoke")
    collect(a, job, stop=lambda m: m.seq >= 3)
    reply = b.subscribe(job, from_seq=0)
    assert reply["from_seq"] == 0 and reply["state"] in ("running", "done")
    got_b = collect(b, job)
    got_a = collect(a, job)
    assert [m.seq for m in got_b] == list(range(len(got_b)))
    assert [m.id for m in got_b][4:] == [m.id for m in got_a]
    assert b.list_jobs()[0]["job"] == job


def test_reconnecting_client_resumes_from_its_last_seq_without_loss(make_server, make_client):
    srv = make_server(runner=StepRunner(steps=12, step_seconds=0.03))
    first = make_client(srv.endpoint)
    job = first.submit("resume me", preset="smoke")
    seen = collect(first, job, stop=lambda m: m.seq >= 5)
    last = first.last_seq(job)
    first.close()  # the add-on's Blender was closed mid-job
    time.sleep(0.2)
    second = make_client(srv.endpoint)
    second.subscribe(job, from_seq=last + 1)
    rest = collect(second, job)
    seqs = [m.seq for m in seen] + [m.seq for m in rest]
    assert seqs == list(range(len(seqs))) and rest[-1].type == "job_done"
    # Replay of a finished job is exact: same ids, fields and arrays as stored.
    replay = make_client(srv.endpoint)
    replay.subscribe(job, from_seq=0)
    again = collect(replay, job)
    assert [m.id for m in again] == [m.id for m in seen + rest]
    for old, new in zip(seen + rest, again):
        assert old.fields == new.fields and set(old.arrays) == set(new.arrays)
        for name in old.arrays:
            np.testing.assert_array_equal(old.arrays[name], new.arrays[name])


def test_server_restart_resumes_the_job_from_its_checkpoint_and_the_client_follows(tmp_path, make_server, make_client):
    store = tmp_path / "store"
    srv = make_server(runner=StepRunner(steps=10, step_seconds=0.08), store=store)
    endpoint = srv.endpoint
    client = make_client(endpoint, heartbeat=0.2)
    job = client.submit("survive a restart", preset="smoke")
    before = collect(client, job, stop=lambda m: m.type == "progress" and m.fields["step"] >= 3)
    srv.stop()  # the worker is told to stop; the job stays "running" on disk, like a crash mid-stage
    assert JobStore(store).get(job).state["state"] == "running"
    runner = StepRunner(steps=10, step_seconds=0.02)
    make_server(runner=runner, store=store, bind=endpoint)
    after = collect(client, job, timeout=40)  # the same client: it notices the new server and resubscribes
    seqs = [m.seq for m in before + after]
    assert seqs == list(range(len(seqs))), "an event was lost or duplicated across the restart"
    assert after[-1].type == "job_done" and after[-1].fields["report"]["resumed_from"] >= 3
    assert any(m.type == "log" and "resuming" in m.fields["message"] for m in after)
    assert client.status(job)["resumes"] == 1


def test_a_failing_job_reports_its_error_and_the_server_goes_on(make_server, make_client):
    srv = make_server(runner=StepRunner(steps=5, fail_at=2))
    client = make_client(srv.endpoint)
    job = client.submit("doomed", preset="smoke")
    events = collect(client, job)
    assert events[-1].type == "error" and "synthetic failure at step 2" in events[-1].fields["message"]
    assert events[-1].fields["code"] == "job_failed"
    status = client.status(job)
    assert status["state"] == "failed" and "synthetic failure" in status["error"]
    assert client.ping() < 1.0


def test_submit_errors_name_the_problem(make_server, make_client):
    srv = make_server()
    client = make_client(srv.endpoint)
    with pytest.raises(RequestError, match="unknown preset 'huge'"):
        client.submit("x", preset="huge")
    with pytest.raises(RequestError, match="unknown setting stage1.stepz"):
        client.submit("x", preset="smoke", overrides={"stage1.stepz": 3})
    with pytest.raises(RequestError, match="unknown job"):
        client.status("0" * 32)
    job = client.submit("x", preset="smoke")
    with pytest.raises(ProtocolError, match="not in the expected form"):  # refused before it is sent
        client.fetch(job, names=["../spec.json"])
    collect(client, job)
    with pytest.raises(RequestError, match="has no result file 'spec.json'"):
        client.fetch(job, names=["spec.json"])


def test_input_mesh_reaches_the_runner(make_server, make_client):
    runner = StepRunner(steps=2)
    srv = make_server(runner=runner)
    client = make_client(srv.endpoint)
    mesh = cube_mesh(2.0)
    job = client.submit("refine this", preset="smoke", mesh=mesh, start_stage="texture", start_t=0.3)
    collect(client, job)
    call = runner.calls[0]
    assert call["start_stage"] == "texture" and call["start_t"] == pytest.approx(0.3)
    np.testing.assert_array_equal(call["input_mesh"].vertices, mesh["vertices"])
    np.testing.assert_array_equal(call["input_mesh"].faces, mesh["faces"])


def test_a_torn_event_log_tail_is_detected_and_cut(make_server, make_client, tmp_path):
    store = tmp_path / "store"
    srv = make_server(store=store)
    client = make_client(srv.endpoint)
    job = client.submit("x", preset="smoke")
    n = len(collect(client, job))
    srv.stop()
    log = store / "jobs" / job / "events.log"
    with open(log, "ab") as fh:
        fh.write(b"\x40\x00\x00\x00\x01\x02")  # a record header whose body never made it to disk
    reopened = JobStore(store)
    assert reopened.get(job).next_seq == n and "torn" in reopened.repairs[0]
    assert reopened.get(job).read_event(n - 1).type == "job_done"


def test_binding_beyond_loopback_needs_keys(tmp_path):
    with pytest.raises(ServerConfigError, match="needs authentication"):
        Server(tmp_path / "s", "tcp://0.0.0.0:5555")
    with pytest.raises(ServerConfigError, match="needs authentication"):
        Server(tmp_path / "s", "tcp://*:5555")


def test_sink_cleans_pipeline_events_and_reports_what_it_drops(tmp_path):
    from dreamflow.server import JobSink, JobStore

    store = JobStore(tmp_path / "s")
    job = store.create({"prompt": "p", "object_id": "Obj"}, {})
    published = []
    sink = JobSink(job, lambda j, m: published.append(m))
    sink.emit("progress", {"stage": "stage1", "step": np.int64(2), "total": 5, "loss": float("nan"), "elapsed": float("inf"),
                           "colour": "red"})
    sink.emit("stage_done", {"stage": "stage1", "report": {"psnr": float("inf"), "n": np.float32(1.5)}})
    sink.emit("mesh", {"stage": "stage1", "step": 1}, {k: v.astype(np.float64) if k != "faces" else v.astype(np.int64)
                                                       for k, v in cube_mesh().items() if k != "texture"})
    sink.emit("preview", {"stage": "stage1", "step": 1}, {"rgb": np.ones((4, 4, 3), np.float32)})
    sink.emit("teleport", {})
    kinds = [(m.type, m.seq) for m in published]
    assert [k for k, _ in kinds] == ["log", "progress", "stage_done", "mesh", "preview", "log"]
    assert [s for _, s in kinds] == list(range(6))
    progress = published[1].fields
    assert progress["loss"] is None and "elapsed" not in progress and progress["step"] == 2
    assert "no field 'colour'" in published[0].fields["message"]
    assert published[2].fields["report"] == {"psnr": None, "n": 1.5}
    mesh = published[3]
    assert mesh.fields["object_id"] == "Obj" and mesh.arrays["vertices"].dtype == np.float32
    assert mesh.arrays["faces"].dtype == np.int32
    assert published[4].arrays["image"].dtype == np.uint8 and published[4].arrays["image"].max() == 255
    assert "unknown event kind 'teleport'" in published[5].fields["message"]
    assert job.read_event(3).fields == mesh.fields  # what was published is what was stored


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True), ("tcp://127.0.0.1:*", True),
    ("ipc:///tmp/dreamflow.sock", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://192.168.1.20:5555", False), ("tcp://eth0:5555", False), ("udp://127.0.0.1:5555", False)])
def test_which_endpoints_count_as_loopback(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_a_request_that_timed_out_is_never_delivered_to_a_server_started_later(make_server, make_client):
    import socket

    with socket.socket() as probe:  # a free port, for the server that is not there yet
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    early = make_client(endpoint, connect=False, timeout=0.3)
    with pytest.raises(ConnectionTimeout):
        early.connect()
    with pytest.raises(ConnectionTimeout):
        early.submit("a ghost", preset="smoke")
    make_server(bind=endpoint)
    time.sleep(0.5)  # the early client's socket reconnects meanwhile
    assert early.ping(timeout=5) < 1.0
    assert early.list_jobs() == []  # the timed-out submit did not become a job


def test_a_job_that_ended_without_its_terminal_event_gets_it_on_restart(tmp_path, make_server, make_client):
    store = JobStore(tmp_path / "store")
    job = store.create({"prompt": "p", "preset": "smoke"}, {})
    job.save_state(state="done", files=[])  # the server died between state.json and the event log
    srv = make_server(store=tmp_path / "store")
    client = make_client(srv.endpoint)
    client.subscribe(job.job_id, from_seq=0)
    assert [m.type for m in collect(client, job.job_id)] == ["job_done"]
