"""The Client against a scripted ROUTER: timeouts, zero-copy receive, exactly-once in-order events."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from dreamflow_protocol import Client, ConnectionTimeout, Message, decode, encode, new_id

JOB = "ef" * 16


class FakeServer:
    """A ROUTER the test drives by hand: read a request, answer it, push events."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer = b""
        self.server_id = "s1"

    def recv(self, want: str, timeout: float = 5.0) -> Message:
        """The next request of type ``want``, answering heartbeat pings on the way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart(copy=False)
            self.peer = frames[0].bytes
            msg = decode(frames[1:])
            if msg.type == want:
                return msg
            if msg.type == "ping":
                self.send(msg.reply("pong", {"server_time": time.time(), "server_id": self.server_id}))
        raise AssertionError(f"no {want} request arrived")

    def recv_subscribe(self, from_seq: int, timeout: float = 5.0) -> Message:
        """The next subscribe asking for ``from_seq``, skipping earlier ones a heartbeat gap may cause."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv("subscribe", max(0.1, deadline - time.monotonic()))
            if msg.fields["from_seq"] == from_seq:
                return msg

    def send(self, msg: Message) -> None:
        self.sock.send_multipart([self.peer, *encode(msg)], copy=False)

    def event(self, seq: int, step: int | None = None) -> None:
        self.send(Message("progress", {"stage": "stage1", "step": step if step is not None else seq, "total": 99},
                          job=JOB, seq=seq))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def _events(client: Client, n: int, timeout: float = 5.0) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = client.next_event(0.1)
        if msg is not None:
            out.append(msg)
    return out


def test_no_server_gives_a_clear_timeout():
    client = Client("tcp://127.0.0.1:9", timeout=0.3)
    with pytest.raises(ConnectionTimeout) as info:
        client.connect()
    client.close()
    assert str(info.value) == ("no DreamFlow server answered at tcp://127.0.0.1:9 within 0.3 s; "
                               "start one with `dreamflow serve`")


def test_received_arrays_are_read_only_views_of_the_zmq_frames(fake):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(fake.endpoint)
        image = np.arange(64 * 32 * 4, dtype=np.uint8).reshape(64, 32, 4)
        dealer.send_multipart(encode(Message("submit", {"prompt": "p"}, {"vertices": np.zeros((3, 3), np.float32),
                                                                        "faces": np.array([[0, 1, 2]], np.int32),
                                                                        "texture": image})), copy=False)
        frames = fake.sock.recv_multipart(copy=False)  # as the client and the server receive
        tex = decode(frames[1:]).arrays["texture"]
        assert np.shares_memory(tex, np.frombuffer(frames[-1].buffer, np.uint8))
        assert not tex.flags.writeable and not tex.flags.owndata
        np.testing.assert_array_equal(tex, image)
    finally:
        dealer.close(linger=0)


def test_events_are_delivered_once_in_order_and_a_gap_triggers_a_resubscribe(fake):
    client = Client(fake.endpoint, timeout=5, heartbeat=0.2)
    try:
        replies: dict = {}
        t = threading.Thread(target=lambda: replies.update(caps=client.connect()))
        t.start()
        hello = fake.recv("hello")
        fake.send(hello.reply("capabilities", {
            "protocol": 1, "server_version": "t", "server_id": "s1", "device": "cpu", "accelerators": {}, "presets": [],
            "methods": [], "start_stages": [], "limits": {}, "max_queue": 1, "auth": "none"}))
        t.join(5)
        t = threading.Thread(target=lambda: replies.update(sub=client.subscribe(JOB, from_seq=0)))
        t.start()
        sub = fake.recv("subscribe")
        assert sub.fields["from_seq"] == 0 and sub.job == JOB
        fake.send(sub.reply("subscribed", {"from_seq": 0, "next_seq": 0, "state": "running"}))
        t.join(5)
        for seq in (0, 1, 1, 0, 2):  # duplicates from an overlapping replay are dropped
            fake.event(seq)
        fake.event(5)  # 3 and 4 were lost: the client asks again from 3
        again = fake.recv_subscribe(3)
        assert again.job == JOB
        for seq in (3, 4, 5, 6):
            fake.event(seq)
        got = _events(client, 7)
        assert [m.seq for m in got] == [0, 1, 2, 3, 4, 5, 6]
        assert client.last_seq(JOB) == 6
        # A restarted server (new server_id in pong) gets every open subscription again.
        fake.server_id = "s2"
        resub = fake.recv_subscribe(7)
        assert resub.job == JOB
        assert client.server_id == "s2"
    finally:
        client.close()


def test_request_reply_is_matched_by_parent(fake):
    client = Client(fake.endpoint, timeout=5, heartbeat=5)
    try:
        out: dict = {}
        client._thread = threading.Thread(target=client._run, daemon=True)
        client._thread.start()
        t = threading.Thread(target=lambda: out.update(s=client.status(JOB)))
        t.start()
        req = fake.recv("status")
        fake.send(Message("status_reply", {"job_status": {"state": "other"}}, job=JOB, parent=new_id()))  # not ours
        fake.send(req.reply("status_reply", {"job_status": {"state": "running"}}))
        t.join(5)
        assert out["s"] == {"state": "running"}
    finally:
        client.close()


def test_close_fails_waiting_requests_at_once(fake):
    client = Client(fake.endpoint, timeout=30, heartbeat=5)
    client._thread = threading.Thread(target=client._run, daemon=True)
    client._thread.start()
    errors: list[Exception] = []

    def ask() -> None:
        try:
            client.status()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    fake.recv("status")  # it was sent; the fake never answers
    start = time.monotonic()
    client.close()
    t.join(5)
    assert time.monotonic() - start < 5 and "the client was closed" in str(errors[0])
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.connect()
