"""Faults: vanished clients, torn and corrupt job files, failing jobs, cancel latency, NaN/inf.

The loop-level tests drive the one optimisation loop (methods/loop.py) with a problem that
injects NaN at chosen attempts; the job-level ones go through a real server over loopback.
"""

from __future__ import annotations

import gc
import math
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from reliability_helpers import TINY_REAL_JOB, collect
from server_runners import StepRunner

from dreamflow.events import Cancelled, JobControl, RecordingSink
from dreamflow.methods.loop import Distillation, LoopConfig, Method, NumericalDivergence, Rendered
from dreamflow.methods.noise import FreshNoise
from dreamflow.methods.schedules import TimestepSchedule
from dreamflow.methods.targets import ApfoTarget
from dreamflow.pipeline.image2d import ParticleProblem
from dreamflow.priors.base import IdentityScoreModel
from dreamflow.priors.gmm import GaussianMixturePrior

# ------------------------------------------------------------------------------ clients and files

CLIENT_SCRIPT = """
import sys
from dreamflow_protocol import Client
with Client(sys.argv[1], timeout=10) as c:
    job = c.submit("outlive your client", preset="smoke")
    print("job", job, flush=True)
    while True:
        m = c.next_event(timeout=1.0)
        if m is not None and m.job == job:
            print("event", m.seq, m.id, flush=True)
"""


def test_a_killed_client_leaves_the_job_running_and_a_new_client_gets_every_event_and_the_result(make_server, make_client):
    srv = make_server(runner=StepRunner(steps=14, step_seconds=0.05))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, srv.endpoint], stdout=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    try:
        job = proc.stdout.readline().split()[1]
        while len(seen) < 3:
            _, seq, mid = proc.stdout.readline().split()
            seen[int(seq)] = mid
    finally:
        proc.send_signal(signal.SIGKILL)  # the add-on's Blender crashed mid-job
        proc.wait(10)
    assert srv.server.store.get(job).state["state"] == "running"
    late = make_client(srv.endpoint)
    late.subscribe(job, from_seq=0)
    events = collect(late, job, timeout=60)
    assert [m.seq for m in events] == list(range(len(events))) and events[-1].type == "job_done"
    assert all(events[seq].id == mid for seq, mid in seen.items())  # the same events, not re-made ones
    assert sum(m.type == "progress" for m in events) == 14
    files = late.fetch(job)
    assert files["model.glb"].tobytes() == (srv.server.store.get(job).out_dir / "model.glb").read_bytes()


def _finished_job(make_server, make_client, store: Path) -> tuple[str, int]:
    srv = make_server(runner=StepRunner(steps=6), store=store)
    client = make_client(srv.endpoint)
    job = client.submit("finished", preset="smoke")
    n = len(collect(client, job))
    srv.stop()
    return job, n


def test_a_torn_event_log_is_cut_on_restart_and_a_lost_terminal_event_is_restored(make_server, make_client, tmp_path,
                                                                                  caplog):
    store = tmp_path / "store"
    job, n = _finished_job(make_server, make_client, store)
    log = store / "jobs" / job / "events.log"
    size = log.stat().st_size
    with open(log, "r+b") as fh:
        fh.truncate(size - 5)  # the job_done record lost its last bytes: a crash mid-append
    caplog.set_level("INFO", logger="dreamflow.server")
    srv = make_server(store=store)
    assert any("torn" in r.getMessage() for r in caplog.records)
    client = make_client(srv.endpoint)
    assert client.status(job)["state"] == "done"
    client.subscribe(job, from_seq=0)
    events = collect(client, job)
    assert [m.seq for m in events] == list(range(n)), "the stream must still end, with every seq once"
    assert events[-1].type == "job_done" and events[-1].fields["files"] == ["model.glb", "report.json"]
    assert set(client.fetch(job)) == {"model.glb", "report.json"}


def test_a_corrupt_event_payload_is_reported_to_its_subscriber_and_the_server_keeps_serving(make_server, make_client,
                                                                                             tmp_path):
    store = tmp_path / "store"
    job, n = _finished_job(make_server, make_client, store)
    payloads = sorted((store / "jobs" / job / "events").glob("*.bin"))
    victim = payloads[0]
    victim.write_bytes(victim.read_bytes()[:7])  # bit rot: the file is there but short
    bad_seq = int(victim.stem)
    srv = make_server(store=store)
    client = make_client(srv.endpoint)
    client.subscribe(job, from_seq=0)
    events = collect(client, job)
    assert [m.seq for m in events[:-1]] == list(range(bad_seq))
    assert events[-1].type == "error" and f"event {bad_seq}" in events[-1].fields["message"]
    assert "corrupt" in events[-1].fields["message"] and events[-1].fields["code"] == "corrupt_job"
    assert srv.thread.is_alive() and client.ping() < 1.0
    client.subscribe(job, from_seq=bad_seq + 1)  # what is intact is still served
    rest = collect(client, job)
    assert [m.seq for m in rest] == list(range(bad_seq + 1, n)) and rest[-1].type == "job_done"


def test_an_unreadable_checkpoint_restarts_the_stage_with_a_warning(tmp_path):
    from dreamflow.pipeline.config import build_config
    from dreamflow.pipeline.context import JobContext

    sink = RecordingSink()
    ctx = JobContext(build_config("smoke"), tmp_path / "out", sink, JobControl(), torch.device("cpu"), tmp_path / "ckpt")
    ctx.save_checkpoint("stage1", {"loop": {"iteration": 4}})
    assert ctx.load_checkpoint("stage1")["loop"]["iteration"] == 4
    path = ctx.checkpoint_path("stage1")
    path.write_bytes(path.read_bytes()[:100])  # torn by a disk fault (writes themselves are atomic)
    assert ctx.load_checkpoint("stage1") is None
    (kind, fields, _), = sink.of_kind("log")
    assert fields["level"] == "warning" and "stage1.pt" in fields["message"] and "unreadable" in fields["message"]


# ------------------------------------------------------------------------------ failing jobs

class AllocateThenFail:
    """A job that takes a large tensor on the job's device, does a step, and raises."""

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ref: weakref.ref | None = None

    def __call__(self, config, out_dir, sink, control, **kw):
        big = torch.ones(64, 1024, 1024, device=self.device)  # 256 MiB
        self.ref = weakref.ref(big)
        sink.emit("progress", {"stage": "stage1", "step": 1, "total": 2, "loss": float(big[0, 0, 0])})
        raise MemoryError(f"synthetic allocation failure after taking {big.numel() * 4 >> 20} MiB")


def test_a_job_that_raises_reports_the_error_frees_its_memory_and_the_next_job_runs(make_server, make_client):
    runner = AllocateThenFail()
    srv = make_server(runner=runner)
    client = make_client(srv.endpoint)
    base = torch.cuda.memory_allocated() if runner.device.type == "cuda" else 0
    job = client.submit("doomed", preset="smoke")
    events = collect(client, job)
    assert events[-1].type == "error" and events[-1].fields["code"] == "job_failed"
    assert events[-1].fields["message"] == "MemoryError: synthetic allocation failure after taking 256 MiB"
    assert client.status(job)["state"] == "failed"
    gc.collect()
    assert runner.ref is not None and runner.ref() is None, "the failed job's tensor is still referenced"
    if runner.device.type == "cuda":
        assert torch.cuda.memory_allocated() == base and torch.cuda.memory_reserved() < 256 << 20
    srv.server.worker.runner = StepRunner(steps=2)
    assert collect(client, client.submit("next", preset="smoke"))[-1].type == "job_done"


# ------------------------------------------------------------------------------ the loop

class FlakyParticles(ParticleProblem):
    """Particles whose render (or parameters) turn NaN/inf on chosen render calls (1-based)."""

    def __init__(self, bad_renders: set[int] = frozenset(), bad_params_after: set[int] = frozenset(),
                 value: float = math.nan, seconds: float = 0.0):
        super().__init__(torch.zeros(2, 3, 4, 4), lr=0.05)
        self.bad_renders, self.bad_params_after, self.value, self.seconds = bad_renders, bad_params_after, value, seconds
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def render(self, cameras) -> Rendered:
        self.calls += 1
        self.seen.append(self.particles.detach().clone())
        if self.seconds:
            time.sleep(self.seconds)
        image = self.particles
        if self.calls in self.bad_renders:
            image = image * self.value
        return Rendered(image)

    def after_step(self, index: int) -> None:
        if self.calls in self.bad_params_after:
            with torch.no_grad():
                self.particles[0, 0, 0, 0] = self.value


def _loop(problem: FlakyParticles, iterations: int = 12, **cfg) -> Distillation:
    prior = GaussianMixturePrior(torch.full((1, 3, 4, 4), 0.7), std=0.05)
    method = Method("apfo", ApfoTarget(), TimestepSchedule("decreasing", 1.0, 0.0, 1), FreshNoise())
    return Distillation(problem, method, prior, IdentityScoreModel(), prior.condition(""), None,
                        LoopConfig(iterations=iterations, snapshot_every=5, **cfg), seed=0)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_rolls_back_to_the_last_good_state_with_a_lower_learning_rate(value):
    problem = FlakyParticles(bad_renders={8}, value=value)  # attempt 8 = iteration 7; last snapshot: iteration 5
    loop = _loop(problem)
    history = loop.run()
    assert len(history) == 12 and all(math.isfinite(r.loss) for r in history)
    assert [r.index for r in history] == list(range(12))
    assert torch.equal(problem.seen[8], problem.seen[5]), "the retry must start from the iteration-5 state"
    assert loop.optimiser.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert [r.rollbacks for r in history][5:] == [1] * 7 and loop.state.rollbacks == 1


def test_non_finite_parameters_roll_back_too():
    problem = FlakyParticles(bad_params_after={3}, value=math.inf)
    loop = _loop(problem)
    history = loop.run()
    assert len(history) == 12 and bool(torch.isfinite(problem.particles).all())
    assert torch.equal(problem.seen[3], problem.seen[0]) and loop.state.rollbacks == 1


@pytest.mark.parametrize("kind", ["loss", "parameters"])
def test_repeated_divergence_fails_with_a_clear_message_after_max_rollbacks(kind):
    always = set(range(7, 100))
    problem = FlakyParticles(bad_renders=always) if kind == "loss" else FlakyParticles(bad_params_after=always)
    loop = _loop(problem, max_rollbacks=3)
    with pytest.raises(NumericalDivergence) as info:
        loop.run()
    text = str(info.value)
    assert f"non-finite {kind}" in text and "after 3 rollbacks" in text and "no result was exported" in text
    assert loop.optimiser.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    assert problem.calls == 6 + 4  # six good steps, then the first try and three retries


def test_cancel_stops_the_loop_within_one_optimisation_step():
    step_seconds = 0.2
    problem = FlakyParticles(seconds=step_seconds)
    loop = _loop(problem, iterations=200)
    control = JobControl()
    finished: list[float] = []
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        control.cancel("user pressed cancel")

    timer = threading.Timer(1.0, cancel)
    timer.start()
    with pytest.raises(Cancelled, match="user pressed cancel"):
        loop.run(on_step=lambda r: finished.append(time.monotonic()), control=control)
    stopped = time.monotonic()
    timer.join()
    assert 1 <= len(finished) < 200
    assert sum(t > cancelled_at[0] for t in finished) <= 1, "more than the step in flight ran after the cancel"
    assert problem.calls == len(finished), "a step was started after the cancel"
    assert stopped - cancelled_at[0] < step_seconds + 0.5


# ------------------------------------------------------------------------------ job level

def test_a_diverging_real_job_fails_with_a_clear_message_and_exports_no_mesh(make_server, make_client, monkeypatch):
    from dreamflow.pipeline import stage1

    real_render = stage1.NerfProblem.render

    def nan_render(self, cameras):
        out = real_render(self, cameras)
        return Rendered(out.image * math.nan, out.alpha, out.regulariser)

    monkeypatch.setattr(stage1.NerfProblem, "render", nan_render)
    srv = make_server(runner=None)
    srv.server.worker.runner = _default_runner()
    client = make_client(srv.endpoint)
    job = client.submit("diverge", preset="smoke", seed=1, overrides=TINY_REAL_JOB)
    events = collect(client, job, timeout=120)
    assert events[-1].type == "error" and events[-1].fields["code"] == "job_failed"
    assert events[-1].fields["message"].startswith("NumericalDivergence: optimisation diverged (non-finite loss)")
    assert "no result was exported" in events[-1].fields["message"]
    assert not any(m.type == "mesh" for m in events) and not any(m.type == "progress" for m in events)
    out = srv.server.store.get(job).out_dir
    assert not (out / "model.glb").exists() and client.status(job)["files"] == []


def _default_runner():
    from dreamflow.server.worker import default_runner

    return default_runner


def test_cancel_stops_a_real_job_within_one_optimisation_step(make_server, make_client):
    srv = make_server()
    srv.server.worker.runner = _default_runner()
    client = make_client(srv.endpoint)
    job = client.submit("cancel me", preset="smoke", seed=2, overrides=dict(TINY_REAL_JOB, **{"stage1.steps": 500}))
    progress = collect(client, job, timeout=120, stop=lambda m: m.type == "progress" and m.fields["step"] >= 3)
    steps = [m for m in progress if m.type == "progress"]
    step_seconds = (steps[-1].fields["elapsed"] - steps[-2].fields["elapsed"])
    start = time.monotonic()
    assert client.cancel(job, reason="changed my mind")["state"] in ("cancelling", "cancelled")
    rest = collect(client, job, timeout=60)
    waited = time.monotonic() - start
    assert rest[-1].type == "cancelled" and rest[-1].fields["reason"] == "changed my mind"
    assert sum(m.type == "progress" for m in rest) <= 1, "more than the step in flight ran after the cancel"
    assert waited < 2 * step_seconds + 1.0, f"cancel took {waited:.2f} s with {step_seconds:.2f} s steps"
    assert client.status(job)["state"] == "cancelled" and not (srv.server.store.get(job).out_dir / "model.glb").exists()


def test_a_torn_checkpoint_found_on_restart_is_reported_and_the_stage_starts_again(make_server, make_client, tmp_path):
    from dreamflow.server import JobStore

    store = JobStore(tmp_path / "store")
    job = store.create({"prompt": "torn", "preset": "smoke", "method": "apfo", "seed": 1,
                        "overrides": dict(TINY_REAL_JOB, **{"stage1.steps": 4})}, {})
    job.save_state(state="running")  # the server died while it ran...
    (job.checkpoint_dir / "stage1.pt").write_bytes(b"PK\x03\x04" + bytes(range(200)))  # ...and its checkpoint is damaged
    srv = make_server(runner=_default_runner(), store=tmp_path / "store")
    client = make_client(srv.endpoint)
    client.subscribe(job.job_id, from_seq=0)
    events = collect(client, job.job_id, timeout=180)
    logs = [m.fields["message"] for m in events if m.type == "log"]
    assert any("resuming" in text for text in logs)
    assert any(text.startswith("checkpoint stage1.pt is unreadable") and "starts again from its first step" in text
               for text in logs), logs
    steps = [m.fields["step"] for m in events if m.type == "progress"]
    assert steps == [1, 2, 3, 4] and events[-1].type == "job_done"
    assert client.status(job.job_id)["resumes"] == 1


def test_a_job_that_cannot_record_its_end_does_not_take_the_worker_with_it(make_server, make_client, monkeypatch):
    from dreamflow.server.store import JobRecord

    real_append = JobRecord.append_event

    def disk_full_for_errors(self, msg):
        if msg.type == "error":
            raise OSError(28, "No space left on device")  # the job's end cannot be written
        return real_append(self, msg)

    monkeypatch.setattr(JobRecord, "append_event", disk_full_for_errors)
    srv = make_server(runner=StepRunner(steps=3, fail_at=1))
    client = make_client(srv.endpoint)
    doomed = client.submit("fails on a full disk", preset="smoke")
    deadline = time.monotonic() + 30
    while client.status(doomed)["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = client.status(doomed)
    assert status["state"] == "failed" and "synthetic failure at step 1" in status["error"]
    srv.server.worker.runner = StepRunner(steps=2)
    assert collect(client, client.submit("the next job", preset="smoke"))[-1].type == "job_done"
