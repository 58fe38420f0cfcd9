"""Scale-out figures: jobs per hour for 1 and 2 Ray workers against the in-process server, and what
Ray adds to each job (start-up and placement, event latency, time to the first progress event).

Run: ``.venv/bin/python bench/scale.py`` (a few minutes on the 2-core VM). It starts a real
Ray cluster on this machine (a head node and a second node, one fake GPU each: ``ray start
--num-gpus 1``), and the real ``dreamflow serve`` command, in-process and with ``--ray``; the jobs
are identical real smoke jobs (stage 1 on the reference prior, checkpoints every 2 steps unless
``--checkpoint-every`` says otherwise), all submitted at once.

Each configuration first runs one job per worker (the warm-up: cold workers, a new process each),
then the measured batch, which is what a queue that runs all day sees:

- jobs/hour: jobs of the measured batch / (time from its first submit to its last job_done) x 3600;
- first progress: from submit to the first progress event at the client, for the warm-up's first
  job (a cold worker: placement, a new process, imports);
- start-up: from asking for a worker to the job's start on it, as the server records it: cold (the
  warm-up's, a new actor) and warm (the measured batch's median, mostly warm workers);
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "ray"), str(REPO / "tests" / "reliability"), str(REPO / "tests")]

from ray_helpers import LocalCluster  # noqa: E402
from reliability_helpers import TINY_REAL_JOB, serve, stop  # noqa: E402

from dreamflow_protocol import Client  # noqa: E402


def run_batch(endpoint: str, jobs: int, steps: int, checkpoint_every: int = 2) -> dict:
    """Submit ``jobs`` identical jobs at once and follow them to the end; the figures of the batch."""
    overrides = dict(TINY_REAL_JOB, **{"stage1.steps": steps, "stage1.preview_every": 5, "checkpoint_every": checkpoint_every})
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


def startup_seconds(store: Path, batch: dict) -> list[float]:
    """Seconds from asking for a worker to the job's start on it, for each job, as the server recorded them."""
    states = [json.loads((store / "jobs" / job / "state.json").read_text()) for job in batch["jobs"]]
    return [s["ray_start_seconds"] for s in states if s.get("ray_start_seconds") is not None]


#: Which process does what, by its command line (first match wins).
ROLES = (("ray::JobActor", "job workers"), ("dreamflow serve", "server"), ("raylet", "Ray daemons"), ("gcs_server", "Ray daemons"),
         ("ray/", "Ray daemons"), ("ray::", "Ray daemons"), ("bench/scale.py", "bench client"))


class CpuByRole:
    """CPU seconds each kind of process used while it ran (every process on the machine, from /proc,
    sampled every 0.25 s so that workers that come and go are counted too)."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            role = next((name for key, name in ROLES if key in cmd), "other")
            out[int(pid)] = (role, (int(fields[11]) + int(fields[12])) / self._tick)
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._last.update(self._sample())

    def __enter__(self) -> "CpuByRole":
        self._start = {pid: cpu for pid, (_, cpu) in self._sample().items()}
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        self.wall = time.monotonic() - self._t0
        self.seconds: dict[str, float] = {}
        for pid, (role, cpu) in self._last.items():
            self.seconds[role] = self.seconds.get(role, 0.0) + cpu - self._start.get(pid, 0.0)

    def text(self) -> str:
        """One line: CPU seconds by role, against what the machine's cores offered."""
        parts = [f"{role} {sec:.1f}" for role, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]) if sec >= 0.05]
        return f"CPU s: {', '.join(parts)}; of {os.cpu_count() * self.wall:.0f} available"


def measure(endpoint: str, workers: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """The warm-up batch (one job per worker) and the measured batch (with the CPU each kind of process used)."""
    warmup = run_batch(endpoint, workers, args.steps, args.checkpoint_every)
    with CpuByRole() as cpu:
        batch = run_batch(endpoint, args.jobs, args.steps, args.checkpoint_every)
    batch["cpu"] = cpu.text()
    return warmup, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="identical jobs in each measured batch")
    parser.add_argument("--steps", type=int, default=20, help="stage-1 steps per job")
    parser.add_argument("--checkpoint-every", type=int, default=2,
                        help="steps between checkpoints (2: the fault tests' cadence, a 9 MB checkpoint every 50 ms; "
                             "the presets checkpoint every 50-100 steps)")
    parser.add_argument("--worker-idle", type=float, default=None,
                        help="dreamflow serve --worker-idle (default: the server's; 0: a new worker for every job)")
    args = parser.parse_args()
    idle = [] if args.worker_idle is None else ["--worker-idle", str(args.worker_idle)]
    env = {"PYTHONPATH": f"{REPO / 'backend'}{os.pathsep}{REPO / 'shared'}", "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfscale-") as tmp:
        store = Path(tmp) / "inproc"
        proc, endpoint = serve(store, "--log-level", "warning", env=env)
        try:
            run_batch(endpoint, 1, 2)  # warm the page cache (torch, the pipeline) for every configuration alike
            warmup, base = measure(endpoint, 1, args)
        finally:
            stop(proc)
        rows.append(("in-process (1 job at a time)", base, warmup, None))

        cluster = LocalCluster()
        try:
            cluster.start(nodes=1)
            for workers in (1, 2):
                if workers == 2:
                    cluster.add_node()
                store = Path(tmp) / f"ray{workers}"
                proc, endpoint = serve(store, "--log-level", "warning", "--ray", cluster.address, *idle, env=env)
                try:
                    warmup, batch = measure(endpoint, workers, args)
                finally:
                    stop(proc)
                startup = (statistics.median(startup_seconds(store, warmup)), statistics.median(startup_seconds(store, batch)))
                rows.append((f"Ray, {workers} worker node{'s' if workers > 1 else ''} x 1 GPU", batch, warmup, startup))
        finally:
            cluster.teardown()

    print(f"{args.jobs} identical smoke jobs ({args.steps} stage-1 steps each, a checkpoint every {args.checkpoint_every}), "
          f"submitted at once; Ray workers idle for {'the default' if args.worker_idle is None else args.worker_idle} s; machine: "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'runner':<32} {'jobs/hour':>10} {'wall s':>8} {'first progress s':>17} {'start-up s cold/warm':>21} "
          f"{'relay p50 ms':>13} {'relay p99 ms':>13}")
    for name, batch, warmup, startup in rows:
        latency = batch["server"].get("relay_latency_ms") or {}
        start_text = f"{startup[0]:.2f} / {startup[1]:.2f}" if startup else "-"
        p50, p99 = latency.get("p50"), latency.get("p99")
        print(f"{name:<32} {batch['jobs_per_hour']:>10.0f} {batch['wall']:>8.1f} {warmup['first_progress']:>17.2f} "
              f"{start_text:>21} {('-' if p50 is None else f'{p50:.1f}'):>13} {('-' if p99 is None else f'{p99:.1f}'):>13}")
    print("during each measured batch:")
    for name, batch, _, _ in rows:
        print(f"  {name}: {batch['cpu']}")
    p50, p99 = inprocess_emit_ms()
    print(f"in-process, emit -> stored and published: p50 {p50:.1f} ms, p99 {p99:.1f} ms (JobSink.emit on a real store); "
          f"Ray adds the relay latency above minus this")
    one, two = rows[1][1]["jobs_per_hour"], rows[2][1]["jobs_per_hour"]
    print(f"2 workers / 1 worker: {two / one:.2f}x (target >= 1.8x); "
          f"Ray 1 worker / in-process: {one / rows[0][1]['jobs_per_hour']:.2f}x")


if __name__ == "__main__":
    main()
