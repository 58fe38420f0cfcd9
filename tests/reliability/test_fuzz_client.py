"""The add-on's client against a broken or hostile server: fuzzed frames never kill its I/O
thread, never reach the application malformed, and it keeps working afterwards."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import zmq
from hypothesis import given
from reliability_helpers import SAMPLE_FRAMES, fuzz, mutated_frames

from dreamflow_protocol import Client, decode, encode

CLIENT_CASES = 400
CAPABILITIES = {"protocol": 1, "server_version": "0", "server_id": "fuzz", "device": "cpu", "accelerators": {},
                "presets": ["smoke"], "methods": ["apfo"], "start_stages": ["texture"], "limits": {}, "max_queue": 1,
                "auth": "none"}


def _serve_while(router: zmq.Socket, call: Callable[[], Any], answered: list[str] | None = None) -> tuple[Any, bytes]:
    """Run ``call`` on a thread while this thread answers hello and pings on ``router``; its result and
    the peer (the types of the requests answered are appended to ``answered``)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()))
    thread.start()
    peer = b""
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        if not router.poll(50):
            continue
        peer, *frames = router.recv_multipart()
        msg = decode(frames)
        if answered is not None:
            answered.append(msg.type)
        if msg.type == "hello":
            router.send_multipart([peer, *encode(msg.reply("capabilities", CAPABILITIES))])
        elif msg.type == "ping":
            router.send_multipart([peer, *encode(msg.reply("pong", {"server_time": time.time(), "server_id": "fuzz"}))])
    thread.join(5)
    assert "value" in result, "the client call did not complete"
    return result["value"], peer


def test_garbage_from_the_server_is_dropped_and_the_client_keeps_working():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = Client(f"tcp://127.0.0.1:{port}", timeout=10, heartbeat=30.0)
    try:
        caps, peer = _serve_while(router, client.connect)
        assert caps["server_id"] == "fuzz"
        ran = [0]

        @fuzz(CLIENT_CASES)
        @given(mutated_frames(SAMPLE_FRAMES))
        def prop(frames):
            ran[0] += 1
            router.send_multipart([peer, *frames])

        prop()
        assert ran[0] >= CLIENT_CASES
        # It still works: its next request reaches the server over the same connection and the
        # answer reaches the caller (ping() raises unless the pong arrives).
        answered: list[str] = []
        rtt, again = _serve_while(router, lambda: client.ping(timeout=20), answered)
        assert answered and set(answered) == {"ping"} and again == peer and rtt > 0  # (queued heartbeats are pings too)
        assert client._thread is not None and client._thread.is_alive(), "the client's I/O thread died"
        assert 0 < len(client.dropped) <= 100  # malformed ones were noticed; the record of them is bounded
        for msg in client.poll_events():  # whatever reached the application is well-formed
            encode(msg)
    finally:
        client.close()
        router.close(linger=0)
