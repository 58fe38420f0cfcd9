"""In-process servers on free loopback ports, clients and event collection, shared by the server and
reliability suites (fixtures are registered by tests/conftest.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import zmq

from dreamflow.server import Server
from dreamflow_protocol import TERMINAL_TYPES, Client, Message
from server_runners import StepRunner


class RunningServer:
    """A server serving on a background thread; ``stop()`` ends it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        for attempt in range(30):  # an in-process restart may find the old listener not yet closed
            try:
                self.endpoint = server.open()
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or attempt == 29:
                    raise
                time.sleep(0.1)
        self.thread = threading.Thread(target=server.serve_forever, name="test-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the socket loop and the worker; fail if they do not end."""
        self.server.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture
def make_server(tmp_path: Path) -> Callable[..., RunningServer]:
    """Start servers (StepRunner jobs unless told otherwise); all are stopped after the test."""
    started: list[RunningServer] = []

    def make(runner: Any = None, store: Path | None = None, bind: str = "tcp://127.0.0.1:*", **kw: Any) -> RunningServer:
        srv = RunningServer(Server(store or tmp_path / "store", bind, runner=runner or StepRunner(), **kw))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        if srv.thread.is_alive():
            srv.stop()


@pytest.fixture
def make_client() -> Callable[..., Client]:
    """Connected clients, closed after the test."""
    clients: list[Client] = []

    def make(endpoint: str, connect: bool = True, **kw: Any) -> Client:
        kw.setdefault("timeout", 10.0)
        client = Client(endpoint, **kw)
        clients.append(client)
        if connect:
            client.connect()
        return client

    yield make
    for client in clients:
        client.close()


def collect(client: Client, job: str, timeout: float = 30.0, stop: Callable[[Message], bool] | None = None) -> list[Message]:
    """The job's events as the client delivers them, until a terminal one (or ``stop``)."""
    events: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.next_event(timeout=0.2)
        if msg is None or msg.job != job:
            continue
        events.append(msg)
        if msg.type in TERMINAL_TYPES or (stop is not None and stop(msg)):
            return events
    raise AssertionError(f"job {job} did not finish within {timeout} s; got {[m.type for m in events]}")


def assert_glb_holds_the_final_mesh(glb: bytes, final_mesh_arrays: dict, folder) -> None:
    """A fetched model.glb is the job's final asset: the faces, vertices, UVs and texture of the
    job's last ``mesh`` event with ``final`` set (read back by the project's GLB reader)."""
    import numpy as np

    from dreamflow.export.files import read_glb

    path = folder / "fetched.glb"
    path.write_bytes(bytes(glb))
    back = read_glb(path)
    want = dict(final_mesh_arrays)
    assert np.array_equal(back.faces, want["faces"])
    assert np.allclose(back.vertices, want["vertices"], atol=1e-6)
    assert want.get("uvs") is not None and np.allclose(back.uvs, want["uvs"], atol=1e-6)
    assert want.get("texture") is not None and np.array_equal(back.texture, want["texture"])
