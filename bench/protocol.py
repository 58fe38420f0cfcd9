"""Protocol figures: ping round trip while a job computes, during big uploads and with stale subscriptions, and mesh throughput.

Run: ``.venv/bin/python bench/protocol.py``. Prints ping median/p99 (a server on loopback whose
worker runs real numpy work in steps; then while 256 MiB submits arrive; then with 10,000
subscriptions left by peers that vanished) and the throughput of a 200,000-face mesh with a 1024x1024
RGB texture sent DEALER -> ROUTER with the protocol's codec (encode, send, receive, decode with
full validation). Array payloads are never copied in user code: encode hands the arrays' memory
to ZeroMQ (copy=False) and decode wraps the received frames with np.frombuffer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import numpy as np
import zmq

from dreamflow.server import Server
from dreamflow_protocol import Client, Limits, Message, decode, encode


class BusyRunner:
    """A stand-in job: ``steps`` steps of numpy matrix work, honouring cancel each step."""

    def __init__(self, steps: int, step_seconds: float) -> None:
        self.steps, self.step_seconds = steps, step_seconds
        self.started = threading.Event()

    def __call__(self, config: Any, out_dir: Any, sink: Any, control: Any, **_: Any) -> Any:
        a = np.random.default_rng(0).random((256, 256))
        self.started.set()
        for step in range(self.steps):
            control.check()
            end = time.perf_counter() + self.step_seconds
            while time.perf_counter() < end:
                a = np.tanh(a @ a.T * 1e-3)
            sink.emit("progress", {"stage": "stage1", "step": step + 1, "total": self.steps})
        raise RuntimeError("the bench job ran out of steps before the bench finished")


def bench_ping(count: int) -> tuple[float, float, int]:
    """Ping round trips (s) while a job computes: median, p99, and the job's steps done meanwhile."""
    runner = BusyRunner(steps=100_000, step_seconds=0.05)
    with tempfile.TemporaryDirectory() as store:
        server = Server(store, "tcp://127.0.0.1:*", runner=runner)
        endpoint, thread = _serving(server)
        try:
            with Client(endpoint, timeout=10) as client:
                job = client.submit("bench", preset="smoke", subscribe=False)
                runner.started.wait(30)
                rtts = []
                for _ in range(count):
                    rtts.append(client.ping())
                    time.sleep(0.005)
                steps = client.status(job)["step"] or 0
                client.cancel(job)
        finally:
            server.stop()
            thread.join(30)
    return (*_p99(rtts), steps)


def _p99(rtts: list[float]) -> tuple[float, float]:
    rtts = sorted(rtts)
    return statistics.median(rtts), rtts[min(len(rtts) - 1, int(round(0.99 * (len(rtts) - 1))))]


def _serving(server: Server) -> tuple[str, threading.Thread]:
    endpoint = server.open()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return endpoint, thread


def _ping_while(client: Client, busy: threading.Event, rtts: list[float]) -> None:
    while busy.is_set():
        rtts.append(client.ping(timeout=30))
        time.sleep(0.005)


class QuickRunner:
    """A stand-in job that ends at once (the upload is what is measured)."""

    def __call__(self, config: Any, out_dir: Any, sink: Any, control: Any, **_: Any) -> Any:
        return type("Result", (), {"files": {}, "report": {}})()


UPLOAD_LIMITS = Limits(max_frame_bytes=512 * 1024 * 1024, max_message_bytes=1024 * 1024 * 1024)


def serve_quick(store: str, endpoint_file: str) -> None:
    """A server process whose jobs end at once (``--serve-quick``): the upload bench's server, as ``dreamflow serve`` runs."""
    server = Server(store, "tcp://127.0.0.1:*", runner=QuickRunner(), limits=UPLOAD_LIMITS)
    endpoint = server.open()
    with open(endpoint_file, "w") as fh:
        fh.write(endpoint)
    server.serve_forever()


def upload(endpoint: str, uploads: int, mib: int) -> None:
    """Send ``uploads`` submits of ``mib`` MiB each (``--upload``): the upload bench's other client, a process of its own."""
    n = mib * 1024 * 1024 // 24  # vertices float32 (n, 3) + faces int32 (n, 3): 24 bytes per row
    vertices = np.random.default_rng(0).random((n, 3), dtype=np.float32)
    faces = (np.arange(3 * n, dtype=np.int64) % n).astype(np.int32).reshape(n, 3)
    with Client(endpoint, timeout=300, limits=UPLOAD_LIMITS) as uploader:
        for _ in range(uploads):
            print("upload", flush=True)
            uploader.submit("upload", preset="smoke", mesh={"vertices": vertices, "faces": faces}, subscribe=False)
    print("done", flush=True)


def bench_ping_during_uploads(uploads: int, mib: int = 256) -> tuple[tuple[float, float, int], tuple[float, float, int], float]:
    """Ping round trips (s) at a server process, while ``mib`` MiB submits arrive from another process and without.

    Returns ((median, p99, pings) during uploads, the same for as long without uploads, seconds per upload).
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as store:
        endpoint_file = f"{store}/endpoint"
        server = subprocess.Popen([sys.executable, __file__, "--serve-quick", f"{store}/jobs", endpoint_file])
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(endpoint_file) or not open(endpoint_file).read():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the bench server did not start")
                time.sleep(0.1)
            endpoint = open(endpoint_file).read()
            with Client(endpoint, timeout=60) as pinger:
                sender = subprocess.Popen([sys.executable, __file__, "--upload", endpoint, str(uploads), str(mib)],
                                          stdout=subprocess.PIPE, text=True)
                assert sender.stdout is not None
                sender.stdout.readline()  # its arrays are made: the first upload begins
                busy = threading.Event()
                busy.set()
                during: list[float] = []
                pings = threading.Thread(target=_ping_while, args=(pinger, busy, during))
                start = time.perf_counter()
                pings.start()
                for line in sender.stdout:
                    if line.strip() == "done":
                        break
                seconds = (time.perf_counter() - start) / uploads
                busy.clear()
                pings.join(60)
                sender.wait(60)
                quiet: list[float] = []
                busy.set()
                pings = threading.Thread(target=_ping_while, args=(pinger, busy, quiet))
                pings.start()
                time.sleep(seconds * uploads)
                busy.clear()
                pings.join(60)
        finally:
            server.terminate()
            server.wait(60)
    return (*_p99(during), len(during)), (*_p99(quiet), len(quiet)), seconds


def bench_ping_with_stale_subscriptions(stale: int, count: int) -> tuple[float, float, int]:
    """Ping round trips (s) with ``stale`` subscriptions of vanished peers while a job computes: median, p99, stale left."""
    runner = BusyRunner(steps=100_000, step_seconds=0.05)
    with tempfile.TemporaryDirectory() as store:
        server = Server(store, "tcp://127.0.0.1:*", runner=runner)
        endpoint, thread = _serving(server)
        ctx = zmq.Context.instance()
        try:
            with Client(endpoint, timeout=30) as client:
                running = client.submit("computes", preset="smoke", subscribe=False)
                waiting = client.submit("waits", preset="smoke", subscribe=False)
                runner.started.wait(30)
                for i in range(stale):  # each peer subscribes (to the running or the waiting job), then vanishes
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(endpoint)
                    job = waiting if i % 10 else running
                    sock.send_multipart(encode(Message("subscribe", {"from_seq": 0}, job=job)), copy=False)
                    sock.recv_multipart()
                    sock.close()
                left = len(server._subs)
                rtts = []
                for _ in range(count):
                    rtts.append(client.ping())
                    time.sleep(0.005)
                client.cancel(waiting)
                client.cancel(running)
        finally:
            server.stop()
            thread.join(30)
    median, p99 = _p99(rtts)
    return median, p99, left


def make_mesh(faces: int = 200_000, texture: int = 1024) -> dict[str, np.ndarray]:
    """A 200,000-face grid mesh with normals, UVs and an RGB texture, as MeshData.arrays() names them."""
    side = int(np.ceil(np.sqrt(faces / 2))) + 1
    u, v = np.meshgrid(np.linspace(0, 1, side, dtype=np.float32), np.linspace(0, 1, side, dtype=np.float32))
    vertices = np.stack([u.ravel(), v.ravel(), np.sin(6 * u.ravel()) * 0.1], axis=1).astype(np.float32)
    idx = np.arange(side * side, dtype=np.int32).reshape(side, side)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])[:faces]
    normals = np.tile(np.array([0, 0, 1], np.float32), (len(vertices), 1))
    uvs = np.stack([u.ravel(), v.ravel()], axis=1).astype(np.float32)
    tex = np.random.default_rng(0).integers(0, 256, size=(texture, texture, 3), dtype=np.uint8)
    return {"vertices": vertices, "faces": np.ascontiguousarray(tris), "normals": normals, "uvs": uvs, "texture": tex}


def bench_throughput(repeats: int) -> tuple[float, float, int, float]:
    """Mesh messages DEALER -> ROUTER over tcp loopback: MB/s, messages/s, bytes per message, decode ms."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    arrays = make_mesh()
    msg = Message("mesh", {"stage": "texture", "step": 1, "final": False, "object_id": "bench"}, arrays, job="ab" * 16, seq=0)
    payload = sum(a.nbytes for a in arrays.values())

    def send() -> None:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, -1)
        dealer.connect(endpoint)
        for _ in range(repeats + 1):
            dealer.send_multipart(encode(msg), copy=False)
        dealer.close()

    sender = threading.Thread(target=send)
    sender.start()
    decode_s = 0.0
    frames = router.recv_multipart(copy=False)  # the first message warms the connection up
    decode(frames[1:])
    start = time.perf_counter()
    for _ in range(repeats):
        frames = router.recv_multipart(copy=False)
        t0 = time.perf_counter()
        out = decode(frames[1:])
        decode_s += time.perf_counter() - t0
        assert out.arrays["faces"].shape == (200_000, 3)
        assert np.shares_memory(out.arrays["texture"], np.frombuffer(frames[-1].buffer, np.uint8))  # no copy
    elapsed = time.perf_counter() - start
    sender.join()
    router.close()
    total = payload * repeats
    return total / elapsed / 1e6, repeats / elapsed, payload, decode_s / repeats * 1e3


class MeshRunner:
    """A stand-in job that emits the same large mesh ``count`` times (the pipeline's live meshes)."""

    def __init__(self, arrays: dict[str, np.ndarray], count: int) -> None:
        self.arrays, self.count = arrays, count

    def __call__(self, config: Any, out_dir: Any, sink: Any, control: Any, **_: Any) -> Any:
        for step in range(self.count):
            control.check()
            sink.emit("mesh", {"stage": "texture", "step": step + 1, "final": step + 1 == self.count}, self.arrays)
        return type("Result", (), {"files": {}, "report": {}})()


def bench_server_meshes(count: int) -> tuple[float, float]:
    """The same mesh through the whole server path (sink, fsynced store, socket thread, client): MB/s, meshes/s."""
    arrays = make_mesh()
    payload = sum(a.nbytes for a in arrays.values())
    with tempfile.TemporaryDirectory() as store:
        server = Server(store, "tcp://127.0.0.1:*", runner=MeshRunner(arrays, count))
        endpoint = server.open()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with Client(endpoint, timeout=30) as client:
                job = client.submit("bench", preset="smoke")
                first = None
                received = 0
                while True:
                    msg = client.next_event(60)
                    if msg is None or msg.type in ("job_done", "error", "cancelled"):
                        break
                    if msg.type == "mesh":
                        first = first or time.perf_counter()
                        received += 1
                elapsed = time.perf_counter() - (first or time.perf_counter())
        finally:
            server.stop()
            thread.join(30)
    # The first mesh's own time is not in the window; count the rest.
    return payload * (received - 1) / max(elapsed, 1e-9) / 1e6, (received - 1) / max(elapsed, 1e-9)


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--meshes", type=int, default=40)
    parser.add_argument("--server-meshes", type=int, default=12)
    parser.add_argument("--uploads", type=int, default=3, help="256 MiB submits sent while pinging")
    parser.add_argument("--stale", type=int, default=10_000, help="subscriptions left by vanished peers")
    parser.add_argument("--only", choices=("ping", "upload", "stale", "throughput"), default=None)
    parser.add_argument("--serve-quick", nargs=2, metavar=("STORE", "ENDPOINT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--upload", nargs=3, metavar=("ENDPOINT", "COUNT", "MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_quick:
        return serve_quick(*args.serve_quick)
    if args.upload:
        return upload(args.upload[0], int(args.upload[1]), int(args.upload[2]))
    if args.only in (None, "ping"):
        median, p99, steps = bench_ping(args.pings)
        print(f"ping round trip while a job computes ({args.pings} pings, job advanced {steps} steps of 50 ms meanwhile): "
              f"median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    if args.only in (None, "upload"):
        (median, p99, n), (q_median, q_p99, q_n), seconds = bench_ping_during_uploads(args.uploads)
        print(f"ping round trip at a server process while another process sends it {args.uploads} submits of 256 MiB "
              f"({n} pings, {seconds:.2f} s per upload): median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms "
              f"(target < 100 ms: {'met' if p99 < 0.1 else 'NOT met'}); the same server as long without uploads "
              f"({q_n} pings): median {q_median * 1e3:.2f} ms, p99 {q_p99 * 1e3:.2f} ms")
    if args.only in (None, "stale"):
        median, p99, left = bench_ping_with_stale_subscriptions(args.stale, args.pings)
        print(f"ping round trip with {left} subscriptions of {args.stale} vanished peers while a job computes "
              f"({args.pings} pings): median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms "
              f"(target < 100 ms: {'met' if p99 < 0.1 else 'NOT met'})")
    if args.only not in (None, "throughput"):
        return
    mbs, rate, payload, dec_ms = bench_throughput(args.meshes)
    print(f"mesh throughput over tcp loopback (200,000 faces + 1024x1024 RGB texture = {payload / 1e6:.1f} MB per message, "
          f"{args.meshes} messages): {mbs:.0f} MB/s, {rate:.1f} meshes/s, decode+validate {dec_ms:.2f} ms per message "
          f"(target >= 500 MB/s: {'met' if mbs >= 500 else 'NOT met'})")
    smbs, srate = bench_server_meshes(args.server_meshes)
    print(f"the same mesh through the server ({args.server_meshes} mesh events: sink, fsynced job store, socket thread, "
          f"client): {smbs:.0f} MB/s, {srate:.1f} meshes/s")


if __name__ == "__main__":
    main()
