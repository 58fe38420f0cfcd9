"""Protocol figures: ping round trip while a job computes, and mesh throughput over loopback.

Run: ``.venv/bin/python bench/protocol.py``. Prints ping median/p99 (a server on loopback whose
worker runs real numpy work in steps) and the throughput of a 200,000-face mesh with a 1024x1024
RGB texture sent DEALER -> ROUTER with the protocol's codec (encode, send, receive, decode with
full validation). Array payloads are never copied in user code: encode hands the arrays' memory
to ZeroMQ (copy=False) and decode wraps the received frames with np.frombuffer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from typing import Any

import numpy as np
import zmq

from dreamflow.server import Server
from dreamflow_protocol import Client, Message, decode, encode


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
        endpoint = server.open()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
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
    rtts.sort()
    return statistics.median(rtts), rtts[min(len(rtts) - 1, int(round(0.99 * (len(rtts) - 1))))], steps


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
    args = parser.parse_args()
    median, p99, steps = bench_ping(args.pings)
    print(f"ping round trip while a job computes ({args.pings} pings, job advanced {steps} steps of 50 ms meanwhile): "
          f"median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    mbs, rate, payload, dec_ms = bench_throughput(args.meshes)
    print(f"mesh throughput over tcp loopback (200,000 faces + 1024x1024 RGB texture = {payload / 1e6:.1f} MB per message, "
          f"{args.meshes} messages): {mbs:.0f} MB/s, {rate:.1f} meshes/s, decode+validate {dec_ms:.2f} ms per message "
          f"(target >= 500 MB/s: {'met' if mbs >= 500 else 'NOT met'})")
    smbs, srate = bench_server_meshes(args.server_meshes)
    print(f"the same mesh through the server ({args.server_meshes} mesh events: sink, fsynced job store, socket thread, "
          f"client): {smbs:.0f} MB/s, {srate:.1f} meshes/s")


if __name__ == "__main__":
    main()
