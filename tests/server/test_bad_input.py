"""Malformed messages over a raw DEALER socket: each gets an error naming the problem, and the server keeps serving."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from server_runners import StepRunner

from dreamflow_protocol import PROTOCOL_VERSION, Limits, Message, decode, encode, new_id

LIMITS = Limits(max_frame_bytes=64 * 1024, max_message_bytes=256 * 1024, max_header_bytes=16 * 1024)


@pytest.fixture
def raw(make_server):
    srv = make_server(runner=StepRunner(steps=2), limits=LIMITS)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(srv.endpoint)
    yield sock
    sock.close()


def _ask(sock: zmq.Socket, frames: list) -> Message:
    sock.send_multipart(frames, copy=False)
    return decode(sock.recv_multipart(copy=False))


def _header(**kw) -> dict:
    h = {"v": PROTOCOL_VERSION, "type": "ping", "id": new_id(), "job": None, "seq": None, "parent": None, "fields": {},
         "buffers": []}
    h.update(kw)
    return h


def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _mesh_header(n_vertices: int, vertex_bytes: int) -> tuple[dict, list]:
    h = _header(type="submit", fields={"prompt": "p", "preset": "smoke"},
                buffers=[{"name": "vertices", "dtype": "float32", "shape": [n_vertices, 3]},
                         {"name": "faces", "dtype": "int32", "shape": [1, 3]}])
    return h, [b"\0" * vertex_bytes, np.zeros((1, 3), np.int32).tobytes()]


CASES = {
    "truncated msgpack": (lambda: ([_pack(_header())[:-7]], None), "not valid msgpack"),
    "not a map": (lambda: ([msgpack.packb([1, 2, 3])], None), "must be a msgpack map"),
    "wrong protocol version": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(v=PROTOCOL_VERSION + 41)),
                               f"protocol version {PROTOCOL_VERSION + 41} is not supported"),
    "unknown message type": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="format_disk")),
                             "unknown message type 'format_disk'"),
    "wrong field type": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="submit", fields={"prompt": ["a"]})),
                         "field 'prompt' must be a string, got a list"),
    "wrong seed type": (lambda: (lambda h: ([_pack(h)], h["id"]))(
        _header(type="submit", fields={"prompt": "a", "seed": 1.5})), "field 'seed' must be an integer"),
    "a server-only type": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="pong", fields={"server_time": 1.0,
                                                                                                 "server_id": "x"})),
                           "not a request"),
    "oversized header": (lambda: ([_pack(_header(fields={"t": 1.0}, pad="x" * 20000))], None), "over the limit of 16384"),
    "oversized frame": (lambda: (lambda hf: ([_pack(hf[0]), *hf[1]], hf[0]["id"]))(_mesh_header(8000, 8000 * 12)),
                        "is 96000 bytes, over the limit of 65536"),
    "array byte length mismatch": (lambda: (lambda hf: ([_pack(hf[0]), *hf[1]], hf[0]["id"]))(_mesh_header(4, 40)),
                                   "float32 [4, 3] = 48 bytes, but its frame holds 40"),
    "disallowed dtype": (lambda: (lambda h: ([_pack(h), b"\0" * 8], h["id"]))(_header(
        type="submit", fields={"prompt": "a"}, buffers=[{"name": "vertices", "dtype": "complex64", "shape": [1]}])),
        "dtype 'complex64'"),
    "unknown job": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="status", job="ab" * 16)), "unknown job"),
    "path in a job id": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="status", job="../../../etc")),
                         "job id must be"),
    "traversal in fetch": (lambda: (lambda h: ([_pack(h)], h["id"]))(_header(type="fetch", job="ab" * 16,
                                                                             fields={"names": ["../spec.json"]})),
                           "not in the expected form"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_message_gets_a_named_error_and_the_server_keeps_serving(raw, case):
    build, words = CASES[case]
    frames, msg_id = build()
    reply = _ask(raw, frames)
    assert reply.type == "error", reply
    assert words in reply.fields["message"], reply.fields["message"]
    assert reply.parent == msg_id  # set whenever the request's id was readable
    ping = Message("ping", {"t": 1.0})
    pong = _ask(raw, encode(ping))
    assert pong.type == "pong" and pong.parent == ping.id


def test_a_frame_beyond_the_transport_cap_drops_only_that_peer(make_server, make_client):
    srv = make_server(limits=LIMITS)
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    # The server itself must hang up on the rogue (its socket's MAXMSGSIZE): watch for it from
    # the rogue's side instead of closing the rogue here.
    monitor = rogue.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        rogue.connect(srv.endpoint)
        rogue.send_multipart([_pack(_header()), b"\0" * (3 * 1024 * 1024)])  # far over MAXMSGSIZE
        assert monitor.poll(30_000), "the server kept the connection of a peer that sent a frame over its cap"
        assert zmq.utils.monitor.recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        rogue.disable_monitor()
        monitor.close()
        rogue.close()
    client = make_client(srv.endpoint)
    assert client.ping() < 1.0
