"""``dreamflow serve --ray`` on a real Ray cluster on loopback: a head node and a second node, each
declaring one fake GPU, so GPU placement is exercised on the CPU.

The cluster is started once for the module (start-up is the slow part) and torn down by process
group, touching no other Ray on the machine. The jobs are real: the pipeline's stage 1 on the
reference prior, checkpointing every 2 steps. The server is the real command, in a subprocess,
so it can be killed like a crash.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh

from dreamflow_protocol import Client, RequestError
from ray_helpers import REPO, LocalCluster
from server_support import collect

sys.path.insert(0, str(REPO / "tests" / "reliability"))
from reliability_helpers import TINY_REAL_JOB, serve, stop  # noqa: E402

pytestmark = pytest.mark.slow


def job_overrides(steps: int, preview_every: int = 0) -> dict:
    """A tiny real job of ``steps`` stage-1 steps, checkpointed every 2 (with a preview image every few)."""
    return dict(TINY_REAL_JOB, **{"stage1.steps": steps, "stage1.preview_every": preview_every})


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster().start(nodes=2)
    yield c
    c.teardown()


@pytest.fixture
def ray_server(cluster, tmp_path):
    """Start ``dreamflow serve --ray`` on the cluster; (start, store): start() may be called again (a restart)."""
    store = tmp_path / "store"
    procs = []

    def start(bind: str = "tcp://127.0.0.1:*", *extra: str) -> str:
        proc, endpoint = serve(store, "--log-level", "warning", "--ray", cluster.address, *extra, bind=bind,
                               env={"PYTHONPATH": cluster.env["PYTHONPATH"]})
        procs.append(proc)
        return endpoint

    yield start, store, procs
    for proc in procs:
        stop(proc)


def state_of(store: Path, job: str) -> dict:
    """The job's state.json as the server last wrote it."""
    return json.loads((store / "jobs" / job / "state.json").read_text())


def wait_for(what, timeout: float, every: float = 0.2):
    """Poll ``what()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting after {timeout} s")


def collect_all(client: Client, jobs: list[str], timeout: float) -> list:
    """Events of several jobs as they arrive, until each has ended."""
    events, open_jobs = [], set(jobs)
    deadline = time.monotonic() + timeout
    while open_jobs and time.monotonic() < deadline:
        msg = client.next_event(timeout=0.2)
        if msg is not None and msg.job in jobs:
            events.append(msg)
            if msg.type in ("job_done", "error", "cancelled"):
                open_jobs.discard(msg.job)
    assert not open_jobs, f"jobs {sorted(open_jobs)} did not end within {timeout} s"
    return events


def assert_once_in_order(events) -> None:
    """Every event exactly once: seqs 0..n-1 in order, ids all different."""
    assert [m.seq for m in events] == list(range(len(events))), "an event was lost, repeated or reordered"
    assert len({m.id for m in events}) == len(events), "an event was delivered twice"


def test_cancel_reaches_a_remote_job_within_one_step_and_frees_its_gpu(cluster, ray_server):
    start, store, procs = ray_server
    client = Client(start(), timeout=30)
    with client:
        job = client.submit("cancel me", preset="smoke", seed=3, overrides=job_overrides(2000))
        collect(client, job, timeout=240, stop=lambda m: m.type == "progress" and m.fields["step"] >= 3)
        assert client.cancel(job, reason="changed my mind")["state"] in ("cancelling", "cancelled")
        rest = collect(client, job, timeout=120)
        assert rest[-1].type == "cancelled" and rest[-1].fields["reason"] == "changed my mind"
        note = next(m.fields["message"] for m in rest if m.type == "log" and "cancel reached the worker" in m.fields["message"])
        at, last = map(int, re.search(r"after stage1 step (\d+); the job stopped after step (\d+)", note).groups())
        assert last - at <= 1, note
        assert client.status(job)["state"] == "cancelled" and not (store / "jobs" / job / "out" / "model.glb").exists()
        wait_for(lambda: client.status()["free"].get("GPU") == 2.0, timeout=60)


def test_a_job_that_raises_fails_by_name_and_frees_its_gpu(cluster, ray_server, tmp_path):
    start, store, procs = ray_server
    allowed = tmp_path / "models"  # a folder the operator allows, where the named file is missing
    allowed.mkdir()
    client = Client(start("tcp://127.0.0.1:*", "--models-dir", str(allowed)), timeout=30)
    with client:
        job = client.submit("no such file", preset="smoke", seed=1,
                            overrides=dict(job_overrides(4), **{"prior.reference": str(allowed / "house.glb")}))
        events = collect(client, job, timeout=240)
        assert events[-1].type == "error" and "house.glb" in events[-1].fields["message"]
        assert client.status(job)["state"] == "failed"
        wait_for(lambda: client.status()["free"].get("GPU") == 2.0, timeout=60)


def test_a_killed_worker_process_is_retried_and_after_the_last_retry_the_job_fails_clearly(cluster, ray_server):
    start, store, procs = ray_server
    proc, endpoint = serve(store, "--log-level", "warning", "--ray", cluster.address, "--job-retries", "1",
                           env={"PYTHONPATH": cluster.env["PYTHONPATH"]})
    procs.append(proc)
    client = Client(endpoint, timeout=30)
    with client:
        job = client.submit("unlucky", preset="smoke", seed=5, overrides=job_overrides(2000))
        events = []
        for attempt in (1, 2):
            events += collect(client, job, timeout=240, stop=lambda m: m.type == "progress" and m.fields["step"] >= 3)
            state = state_of(store, job)
            assert state["ray_attempts"] == attempt
            os.kill(state["ray_node"]["pid"], 9)  # the job's worker process dies (OOM killer, a crash)
            if attempt == 1:
                events += collect(client, job, timeout=240, stop=lambda m: m.type == "log" and "was lost" in m.fields["message"])
                assert "retry 1 of 1" in events[-1].fields["message"]
        events += collect(client, job, timeout=240)
    assert_once_in_order(events)
    end = events[-1]
    assert end.type == "error" and "lost its worker 2 times" in end.fields["message"] and "retried 1 times" in end.fields["message"]
    assert state_of(store, job)["state"] == "failed"
    assert (store / "jobs" / job / "checkpoints" / "stage1.pt").is_file(), "the checkpoints were not kept"


def across_a_server_crash(ray_server, steps: int, seed: int, crash_at: int, while_down=None) -> tuple[list, Path, str]:
    """Run a job, SIGKILL the server at step ``crash_at``, call ``while_down(job)``, restart it at the
    same address; (every event the client got, the store, the job)."""
    start, store, procs = ray_server
    endpoint = start()
    client = Client(endpoint, timeout=30, heartbeat=0.3)
    with client:
        job = client.submit("keep going", preset="smoke", seed=seed, overrides=job_overrides(steps))
        before = collect(client, job, timeout=240, stop=lambda m: m.type == "progress" and m.fields["step"] >= crash_at)
        stop(procs[-1], sig=9)  # SIGKILL: no goodbye to the actor
        if while_down is not None:
            while_down(job)
        start(bind=endpoint)  # same address: the client reconnects and resubscribes by itself
        after = collect(client, job, timeout=400)
    events = before + after
    assert_once_in_order(events)
    assert events[-1].type == "job_done"
    return events, store, job


def test_a_restarted_server_reattaches_to_the_job_still_running_on_the_cluster(cluster, ray_server):
    steps = 40
    events, store, job = across_a_server_crash(ray_server, steps, seed=4, crash_at=5)
    logs = [m.fields["message"] for m in events if m.type == "log"]
    assert any("re-attached" in text for text in logs), logs
    assert not any("resum" in text for text in logs), logs
    steps_seen = [m.fields["step"] for m in events if m.type == "progress"]
    assert steps_seen == list(range(1, steps + 1)), "a step was lost or run twice across the restart"
    state = state_of(store, job)
    assert state["ray_attempts"] == 1 and state["state"] == "done"


def test_bad_specs_are_refused_at_the_front_door(cluster, ray_server):
    start, store, procs = ray_server
    endpoint = start()
    client = Client(endpoint, timeout=30)
    with client:
        for spec, words in (({"overrides": {"stage1.stepz": 3}}, "stepz"), ({"preset": "nosuch"}, "nosuch"),
                            ({"overrides": {"stage1.steps": "many"}}, "stage1.steps")):
            with pytest.raises(RequestError, match=words):
                client.submit("bad", **{"preset": "smoke", **spec})
        assert client.status()["jobs"] == 0
    assert not any((store / "jobs").iterdir())
    # The CLI's server summary says where jobs run.
    out = subprocess.run([sys.executable, "-m", "dreamflow", "status", "--connect", endpoint], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=cluster.env["PYTHONPATH"]))
    assert out.returncode == 0 and "running: nothing; Ray at " in out.stdout and "2 jobs at once, 2 GPU free" in out.stdout, out


def test_a_restarted_server_whose_job_lost_its_worker_meanwhile_resumes_it_from_the_checkpoint(cluster, ray_server):
    saved = {}

    def kill_the_worker(job: str) -> None:
        state = state_of(ray_server[1], job)
        saved["at"] = state["ray_checkpoint"]
        os.kill(state["ray_node"]["pid"], 9)  # while no server follows it, the job's worker dies too

    events, store, job = across_a_server_crash(ray_server, 30, seed=6, crash_at=7, while_down=kill_the_worker)
    gone = next(i for i, m in enumerate(events) if m.type == "log" and "worker is gone" in m.fields["message"])
    first_step = next(m.fields["step"] for m in events[gone:] if m.type == "progress")
    saved_stage, saved_step = saved["at"]
    assert saved_stage == "stage1" and first_step == saved_step + 1 > 1
    state = state_of(store, job)
    assert state["ray_attempts"] == 2 and state["resumes"] == 1 and state["state"] == "done"


def test_a_done_job_leaves_its_worker_warm_for_the_next_and_an_unclaimed_one_gives_its_gpu_back(cluster, ray_server):
    start, store, procs = ray_server
    endpoint = start("tcp://127.0.0.1:*", "--worker-idle", "5")
    client = Client(endpoint, timeout=30)
    with client:
        first = client.submit("first", preset="smoke", seed=1, overrides=job_overrides(4))
        assert collect(client, first, timeout=240)[-1].type == "job_done"
        wait_for(lambda: client.status()["warm_workers"] == 1, timeout=5)
        second = client.submit("second", preset="smoke", seed=2, overrides=job_overrides(4))
        events = collect(client, second, timeout=240)
        assert events[-1].type == "job_done"
        # The same process ran both: no placement, no new process, no imports for the second.
        assert state_of(store, second)["ray_node"]["pid"] == state_of(store, first)["ray_node"]["pid"]
        assert any(m.type == "log" and "on a warm worker (its job 2)" in m.fields["message"] for m in events)
        assert state_of(store, second)["ray_start_seconds"] < state_of(store, first)["ray_start_seconds"]
        # No job comes: after --worker-idle seconds the worker ends and its node's GPU is free again.
        wait_for(lambda: client.status()["warm_workers"] == 1, timeout=5)
        wait_for(lambda: client.status()["warm_workers"] == 0 and client.status()["free"].get("GPU") == 2.0, timeout=60)


# Last: it kills the second node.
def test_two_jobs_run_at_once_on_two_nodes_a_third_waits_and_a_killed_node_costs_only_its_last_steps(cluster, ray_server):
    start, store, procs = ray_server
    endpoint = start()
    steps = 30
    client = Client(endpoint, timeout=30)
    with client:
        jobs = [client.submit(f"house {i}", preset="smoke", seed=i, overrides=job_overrides(steps, preview_every=5))
                for i in range(3)]
        first, second, third = jobs
        # Two GPUs: the first two run at once, on different nodes; the third waits its turn.
        placed = wait_for(lambda: all(state_of(store, j).get("ray_node") for j in jobs[:2]) and
                          [state_of(store, j)["ray_node"] for j in jobs[:2]], timeout=240)
        assert placed[0]["node_id"] != placed[1]["node_id"]
        waiting = client.status(third)
        assert waiting["state"] == "queued" and waiting["position"] == 0
        server = client.status()
        assert server["runner"] == "ray" and server["slots"] == 2 and server["queued"] == 1
        assert sorted(server["running_jobs"]) == sorted(jobs[:2])

        # The job on the second node (not the head) loses its node in the middle of stage 1.
        victim_index = next(i for i in range(2) if cluster.nodes[1].runs(placed[i]["pid"]))
        victim = jobs[victim_index]
        seen = {j: [] for j in jobs}
        # Until the victim is well into stage 1 and the other job has started too (on a slow machine
        # the other one's first step can come after the victim's seventh).
        while not (any(m.type == "progress" and m.fields["step"] >= 7 for m in seen[victim])
                   and all(any(m.type == "progress" for m in seen[j]) for j in jobs[:2])):
            msg = client.next_event(timeout=60)
            assert msg is not None, "no event from the running jobs"
            seen[msg.job].append(msg)
        both_ran = [j for j in jobs[:2] if any(m.type == "progress" for m in seen[j])]
        assert len(both_ran) == 2 and not any(m.type == "job_done" for j in jobs for m in seen[j]), \
            "the two jobs did not run at the same time"
        cluster.nodes.pop(1).kill()  # last test of the module: the retry lands on the head once its job is done

        for msg in collect_all(client, jobs, timeout=600):
            seen[msg.job].append(msg)
        for job in jobs:
            events = seen[job]
            assert_once_in_order(events)
            assert events[-1].type == "job_done", events[-1].fields
            assert events[-1].fields["report"]["stages"]["stage1"]["steps"] == steps
            assert any(m.type == "preview" and m.arrays["image"].shape[2] == 3 for m in events)

        lost = [m for m in seen[victim] if m.type == "log" and "was lost" in m.fields["message"]]
        assert len(lost) == 1 and "retry 1 of 2" in lost[0].fields["message"], [m.fields for m in seen[victim] if m.type == "log"]
        saved_step = int(re.search(r"saved at stage1 step (\d+)", lost[0].fields["message"]).group(1))
        assert 2 <= saved_step < steps
        after = seen[victim][seen[victim].index(lost[0]):]
        first_step = next(m.fields["step"] for m in after if m.type == "progress")
        assert first_step == saved_step + 1, "the retry did not start from the last checkpoint the server held"
        state = state_of(store, victim)
        assert state["resumes"] == 1 and state["ray_lost"] == 1 and state["ray_attempts"] == 2
        assert state["ray_node"]["node_id"] != placed[victim_index]["node_id"], "the retry did not run elsewhere"
        for job in jobs:
            if job != victim:
                assert not any(m.type == "log" and "was lost" in m.fields["message"] for m in seen[job])

        # What a late client replays from the store is exactly what was delivered live.
        replay = Client(endpoint, timeout=30)
        with replay:
            replay.subscribe(victim, from_seq=0)
            again = collect(replay, victim, timeout=60)
        assert [m.id for m in again] == [m.id for m in seen[victim]]
        glb = client.fetch(victim, names=["model.glb"])["model.glb"]
        assert len(trimesh.load(io.BytesIO(glb.tobytes()), file_type="glb").geometry) >= 1
