"""Resources: the job store is bounded by a retention setting, and nothing escapes it.

(Ids and names arriving over the wire are fuzzed in test_fuzz_decoder/test_fuzz_server; here the
store's own guards are checked, including against a pipeline that reports files outside it.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from reliability_helpers import collect
from server_runners import StepResult, StepRunner

from dreamflow.server import JobStore, Server, ServerConfigError
from dreamflow.server.store import StoreError
from dreamflow_protocol import RequestError


def _job(store: JobStore, state: str, finished: float | None) -> str:
    job = store.create({"prompt": state, "preset": "smoke"}, {})
    job.save_state(state=state, **({"finished": finished} if finished is not None else {}))
    return job.job_id


def _gone(folder: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not folder.exists()


def test_prune_deletes_the_oldest_finished_jobs_and_never_active_or_protected_ones(tmp_path):
    store = JobStore(tmp_path / "store")
    now = time.time()
    old_failed = _job(store, "failed", now - 5000)
    old_done = _job(store, "done", now - 4000)
    protected = _job(store, "cancelled", now - 3000)
    running = _job(store, "running", None)
    queued = _job(store, "queued", None)
    newer = [_job(store, "done", now - 100 + i) for i in range(2)]
    deleted = store.prune(keep_jobs=2, protect={protected})
    assert deleted == [old_failed, old_done]
    assert {j.job_id for j in store.all()} == {protected, running, queued, *newer}
    assert all(_gone(store.jobs_dir / job) for job in deleted)
    with pytest.raises(StoreError, match="unknown job"):
        store.get(old_done)
    # By age: the protected one goes once it is no longer protected; fresh and active jobs stay.
    assert store.prune(keep_days=1000 / 86400.0, now=now) == [protected]
    assert {j.job_id for j in JobStore(tmp_path / "store").all()} == {running, queued, *newer}


def test_a_crash_mid_prune_leaves_no_half_job(tmp_path):
    store = JobStore(tmp_path / "store")
    job = _job(store, "done", time.time())
    trash = store.jobs_dir / f".deleted-{job}"
    os.replace(store.jobs_dir / job, trash)  # where a crash between rename and delete leaves it
    reopened = JobStore(tmp_path / "store")
    assert reopened.all() == [] and not reopened.repairs  # not a job, not an error
    reopened.prune(keep_jobs=5)
    assert _gone(trash)


def test_the_server_keeps_at_most_keep_jobs_finished_jobs(make_server, make_client):
    srv = make_server(runner=StepRunner(steps=1), keep_jobs=2)
    client = make_client(srv.endpoint)
    jobs = []
    for i in range(4):
        jobs.append(client.submit(f"job {i}", preset="smoke"))
        assert collect(client, jobs[-1])[-1].type == "job_done"
    deadline = time.monotonic() + 10
    while len(client.list_jobs()) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [j["job"] for j in client.list_jobs()] == jobs[:1:-1]
    for old in jobs[:2]:
        with pytest.raises(RequestError, match=f"unknown job {old}"):
            client.status(old)
        assert _gone(srv.server.store.jobs_dir / old)
    assert set(client.fetch(jobs[-1])) == {"model.glb", "report.json"}


@pytest.mark.parametrize("kw", [{"keep_jobs": 0}, {"keep_jobs": -3}, {"keep_days": 0.0}, {"keep_days": -1.0}])
def test_retention_settings_are_checked(tmp_path, kw):
    with pytest.raises(ServerConfigError, match="keep_"):
        Server(tmp_path / "s", "tcp://127.0.0.1:*", **kw)


def test_result_files_cannot_point_outside_the_job_folder(tmp_path):
    store = JobStore(tmp_path / "store")
    job = store.get(_job(store, "done", time.time()))
    (job.out_dir / "leak.txt").symlink_to(job.folder / "spec.json")
    (job.out_dir / "up.txt").symlink_to(tmp_path)
    job.save_state(files=["leak.txt", "up.txt", "../spec.json"])
    for name in ("leak.txt", "up.txt"):
        with pytest.raises(StoreError, match="missing, a link, or outside the job folder"):
            job.open_result(name)
    with pytest.raises(StoreError, match="invalid file name"):
        job.open_result("../spec.json")


class EscapingRunner(StepRunner):
    """A pipeline that reports a result file outside its out folder (a bug or a hostile plug-in)."""

    def __call__(self, config, out_dir, sink, control, **kw):
        super().__call__(config, out_dir, sink, control, **kw)
        return StepResult({"glb": "model.glb", "stolen": "../spec.json"}, {})


def test_a_pipeline_reporting_files_outside_the_store_fails_the_job_by_name(make_server, make_client):
    srv = make_server(runner=EscapingRunner(steps=1))
    client = make_client(srv.endpoint)
    job = client.submit("escape", preset="smoke")
    end = collect(client, job)[-1]
    assert end.type == "error" and "'../spec.json' that is not a file inside the job's out folder" in end.fields["message"]
    with pytest.raises(RequestError, match="no results to fetch: it is failed"):
        client.fetch(job)
