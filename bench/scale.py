"""Scale-out figures: jobs per hour for 1 and 2 Ray workers against the in-process server, and what
Ray adds to each job (start-up and placement, event latency, time to the first progress event).

Run: ``.venv/bin/python bench/scale.py`` (8 minutes on the loaded 2-core VM). It starts a real
Ray cluster on this machine (a head node and a second node, one fake GPU each: ``ray start
--num-gpus 1``), and the real ``dreamflow serve`` command, in-process and with ``--ray``; the jobs
are identical real smoke jobs (stage 1 on the reference prior, checkpoints every 2 steps), all
submitted at once.

- jobs/hour: jobs / (time from the first submit to the last job_done) x 3600;
- first progress: from a job's submit to its first progress event at the client (the first job,
  which waits for no other);
- start-up: from creating a job's actor to its answering on its node (Ray's placement, a new
  worker process, DreamFlow's imports), as the server records it;
- relay latency: from the event's emission on the worker to its being stored and handed to the
  socket thread on the server: what Ray adds to every event. The rest of the way, store to client,
  is the same code for both runners.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "ray"), str(REPO / "tests" / "reliability"), str(REPO / "tests")]

from ray_helpers import LocalCluster  # noqa: E402
from reliability_helpers import TINY_REAL_JOB, serve, stop  # noqa: E402

from dreamflow_protocol import Client  # noqa: E402


def run_batch(endpoint: str, jobs: int, steps: int) -> dict:
    """Submit ``jobs`` identical jobs at once and follow them to the end; the figures of the batch."""
    overrides = dict(TINY_REAL_JOB, **{"stage1.steps": steps, "stage1.preview_every": 5})
    with Client(endpoint, timeout=60) as client:
        start = time.monotonic()
        submitted, first_progress, done = {}, {}, {}
        for i in range(jobs):
            job = client.submit(f"bench {i}", preset="smoke", seed=1, overrides=overrides)
            submitted[job] = time.monotonic()
        while len(done) < jobs:
            msg = client.next_event(timeout=600)
            if msg is None:
                raise RuntimeError(f"no event for 600 s; {len(done)} of {jobs} jobs done")
            if msg.type == "progress" and msg.job not in first_progress:
                first_progress[msg.job] = time.monotonic() - submitted[msg.job]
            elif msg.type in ("error", "cancelled"):
                raise RuntimeError(f"job {msg.job} ended with {msg.type}: {msg.fields}")
            elif msg.type == "job_done":
                done[msg.job] = time.monotonic()
        wall = max(done.values()) - start
        server = client.status()
    first_job = next(iter(submitted))
    return {"wall": wall, "jobs_per_hour": jobs / wall * 3600.0, "first_progress": first_progress[first_job],
            "server": server, "jobs": list(submitted)}


def inprocess_emit_ms(events: int = 300) -> tuple[float, float]:
    """What storing and publishing one event costs in-process (JobSink.emit on a real store, the same
    code both runners run for every event): p50 and p99 in ms."""
    import numpy as np

    from dreamflow.server.store import JobStore
    from dreamflow.server.worker import JobSink

    with tempfile.TemporaryDirectory(prefix="dfscale-emit-") as tmp:
        job = JobStore(tmp).create({"prompt": "bench", "preset": "smoke"}, {})
        sink = JobSink(job, lambda job, msg: None)
        image = np.zeros((64, 64, 3), np.uint8)
        times = []
        for step in range(1, events + 1):
            start = time.perf_counter()
            sink.emit("progress", {"stage": "stage1", "step": step, "total": events, "loss": 0.5, "elapsed": 1.0, "eta": 2.0})
            if step % 5 == 0:
                sink.emit("preview", {"stage": "stage1", "step": step}, {"image": image})
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]


def ray_figures(store: Path, batch: dict) -> dict:
    """Start-up seconds of each job's actor, as the server recorded them."""
    states = [json.loads((store / "jobs" / job / "state.json").read_text()) for job in batch["jobs"]]
    return {"startup": [s.get("ray_start_seconds") for s in states if s.get("ray_start_seconds") is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="identical jobs per configuration")
    parser.add_argument("--steps", type=int, default=20, help="stage-1 steps per job")
    args = parser.parse_args()
    env = {"PYTHONPATH": f"{REPO / 'backend'}{os.pathsep}{REPO / 'shared'}", "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfscale-") as tmp:
        store = Path(tmp) / "inproc"
        proc, endpoint = serve(store, "--log-level", "warning", env=env)
        try:
            run_batch(endpoint, 1, 2)  # warm the page cache (torch, the pipeline) for every configuration alike
            base = run_batch(endpoint, args.jobs, args.steps)
        finally:
            stop(proc)
        rows.append(("in-process (1 job at a time)", base, None))

        cluster = LocalCluster()
        try:
            cluster.start(nodes=1)
            for workers in (1, 2):
                if workers == 2:
                    cluster.add_node()
                store = Path(tmp) / f"ray{workers}"
                proc, endpoint = serve(store, "--log-level", "warning", "--ray", cluster.address, env=env)
                try:
                    batch = run_batch(endpoint, args.jobs, args.steps)
                finally:
                    stop(proc)
                rows.append((f"Ray, {workers} worker node{'s' if workers > 1 else ''} x 1 GPU", batch, ray_figures(store, batch)))
        finally:
            cluster.teardown()

    print(f"{args.jobs} identical smoke jobs ({args.steps} stage-1 steps each), submitted at once; machine: "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'runner':<32} {'jobs/hour':>10} {'wall s':>8} {'first progress s':>17} {'start-up s (median)':>20} "
          f"{'relay p50 ms':>13} {'relay p99 ms':>13}")
    for name, batch, extra in rows:
        latency = batch["server"].get("relay_latency_ms") or {}
        startup = f"{statistics.median(extra['startup']):.2f}" if extra and extra["startup"] else "-"
        p50, p99 = latency.get("p50"), latency.get("p99")
        print(f"{name:<32} {batch['jobs_per_hour']:>10.0f} {batch['wall']:>8.1f} {batch['first_progress']:>17.2f} "
              f"{startup:>20} {('-' if p50 is None else f'{p50:.1f}'):>13} {('-' if p99 is None else f'{p99:.1f}'):>13}")
    p50, p99 = inprocess_emit_ms()
    print(f"in-process, emit -> stored and published: p50 {p50:.1f} ms, p99 {p99:.1f} ms (JobSink.emit on a real store); "
          f"Ray adds the relay latency above minus this")
    one, two = rows[1][1]["jobs_per_hour"], rows[2][1]["jobs_per_hour"]
    print(f"2 workers / 1 worker: {two / one:.2f}x (target >= 1.8x); "
          f"Ray 1 worker / in-process: {one / rows[0][1]['jobs_per_hour']:.2f}x")


if __name__ == "__main__":
    main()
