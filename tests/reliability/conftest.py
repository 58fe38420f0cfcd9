"""Fixtures of the reliability suite: in-process servers on free loopback ports and clients."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_helpers import RunningServer  # noqa: E402
from runners import StepRunner  # noqa: E402  (tests/server/runners.py, put on sys.path by reliability_helpers)

from dreamflow.server import Server  # noqa: E402
from dreamflow_protocol import Client  # noqa: E402


@pytest.fixture
def server_factory(tmp_path: Path) -> Callable[..., RunningServer]:
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
def client_factory() -> Callable[..., Client]:
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
