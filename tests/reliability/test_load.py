"""Load: 20 clients at once submit, subscribe and ping while jobs compute.

Pings stay fast (p99 under 100 ms), the queue limit answers "busy" by name, and every job the
server accepted runs to its end with a complete, gap-free stream.
"""

from __future__ import annotations

import gc
import threading
import time

from server_runners import StepRunner

from dreamflow_protocol import TERMINAL_TYPES, Client, Message, ServerBusy

CLIENTS = 20
PINGS = 15
MAX_QUEUE = 4


def test_twenty_clients_submit_subscribe_and_ping_while_jobs_compute(make_server, make_client):
    runner = StepRunner(steps=12, step_seconds=0.03)
    srv = make_server(runner=runner, max_queue=MAX_QUEUE)
    clients = [make_client(srv.endpoint, heartbeat=0.5, timeout=20) for _ in range(CLIENTS)]
    first = clients[0].submit("the first job", preset="smoke")
    assert runner.started.wait(20)
    start = threading.Barrier(CLIENTS)
    accepted: dict[int, str] = {}
    busy: list[str] = []
    rtts: list[float] = []
    overlapped: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one_client(i: int) -> None:
        client = clients[i]
        try:
            start.wait(30)
            try:
                job = client.submit(f"job of client {i}", preset="smoke", seed=i)
                with lock:
                    accepted[i] = job
            except ServerBusy as exc:
                with lock:
                    busy.append(str(exc))
            if i:
                client.subscribe(first, from_seq=0)  # everyone watches the first job too (client 0 already does)
            mine = []
            for _ in range(PINGS):
                mine.append(client.ping())
                overlapped.append(srv.server.worker.current is not None)
                time.sleep(0.01)
            with lock:
                rtts.extend(mine)
        except BaseException as exc:  # reported below, with the thread's client number
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(CLIENTS)]
    # The server shares this process with pytest; earlier tests (hypothesis above all) leave a big
    # heap whose full garbage collection would pause every thread. A served process has no such heap.
    gc.collect()
    gc.freeze()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        gc.unfreeze()
    assert not errors, errors
    assert len(accepted) + len(busy) == CLIENTS
    assert accepted and busy, (len(accepted), len(busy))
    assert all("queue is full" in text and f"limit {MAX_QUEUE}" in text for text in busy)
    rtts.sort()
    p99 = rtts[int(0.99 * (len(rtts) - 1))]
    assert sum(overlapped) > len(overlapped) // 2, "the pings did not overlap a computing job"
    assert p99 < 0.1, f"ping p99 {p99 * 1000:.1f} ms (median {rtts[len(rtts) // 2] * 1000:.1f} ms) over {len(rtts)} pings"
    # Every job the server accepted completes; each client got its whole stream, and the first job's too.
    for i, client in enumerate(clients):
        jobs = {first} | ({accepted[i]} if i in accepted else set())
        streams = streams_until_done(client, jobs, timeout=120)
        for job, events in streams.items():
            assert events[-1].type == "job_done" and [m.seq for m in events] == list(range(len(events))), job
    # Each job asked about by the client that submitted it (client 0 the first job and its own).
    owned = [(clients[0], first)] + [(clients[i], job) for i, job in sorted(accepted.items())]
    assert len(owned) == 1 + len(accepted) and all(client.status(job)["state"] == "done" for client, job in owned)
    median = rtts[len(rtts) // 2]
    print(f"{len(accepted)} accepted, {len(busy)} busy; ping p99 {p99 * 1000:.1f} ms, median {median * 1000:.1f} ms")


def streams_until_done(client: Client, jobs: set[str], timeout: float) -> dict[str, list[Message]]:
    """Each job's events as delivered to this client, until every one of them has ended."""
    streams: dict[str, list[Message]] = {job: [] for job in jobs}
    open_jobs = set(jobs)
    deadline = time.monotonic() + timeout
    while open_jobs and time.monotonic() < deadline:
        msg = client.next_event(timeout=0.2)
        if msg is None or msg.job not in streams:
            continue
        streams[msg.job].append(msg)
        if msg.type in TERMINAL_TYPES:
            open_jobs.discard(msg.job)
    assert not open_jobs, f"jobs {sorted(open_jobs)} did not end within {timeout} s"
    return streams
