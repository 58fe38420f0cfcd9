"""The client side: one DEALER socket owned by a background thread, used from any thread.

The I/O thread touches nothing but its socket, its doorbell and thread-safe structures, so the
Blender add-on can call it from the UI thread and drain received events from a timer. It matches
replies to requests by ``parent``, sends heartbeats, delivers each job's events exactly once and
in order (duplicates dropped, a gap triggers a resubscribe from the missing sequence number), and
after a reconnect or a server restart resubscribes every open job from the last sequence it saw.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import zmq

from .codec import DEFAULT_LIMITS, Limits, Message, decode, encode
from .schema import TERMINAL_TYPES, ProtocolError
from .wake import Doorbell


class ConnectionTimeout(ConnectionError):
    """No server answered within the timeout."""


class RequestError(RuntimeError):
    """The server answered a request with an ``error`` message."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class ServerBusy(RequestError):
    """The server's job queue is full; try again later."""


@dataclass
class CurveKeys:
    """CURVE keys of a client: the server's public key and the client's own key pair (z85 bytes)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes = field(repr=False)


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None
    subscribe_on_accept: bool = False


class Client:
    """A connection to a DreamFlow server; see the module docstring for its guarantees."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", *, timeout: float = 5.0, heartbeat: float = 1.0,
                 keys: CurveKeys | None = None, limits: Limits = DEFAULT_LIMITS, name: str = "dreamflow-client",
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.limits = limits
        self.name = name
        self.capabilities: dict[str, Any] | None = None
        self._keys = keys
        self._context = context or zmq.Context.instance()
        self._outbox: queue.Queue[tuple[list[Any], Message, float]] = queue.Queue()
        self._unsent: list[tuple[list[Any], Message, float]] = []  # I/O thread only: waiting for a connection
        self._events: queue.Queue[Message] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}      # open subscriptions: job -> last seq delivered (-1: none yet)
        self._last_seq: dict[str, int] = {}  # every job ever seen: job -> last seq delivered
        self._gap_asked: dict[str, float] = {}  # I/O thread only: when a gap last caused a resubscribe
        self._bell = Doorbell()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._server_id: str | None = None
        self._thread: threading.Thread | None = None
        self.dropped: list[str] = []         # why the last malformed messages from the server were dropped

    # ----------------------------------------------------------------------------------- life

    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Start the I/O thread and exchange hello/capabilities; ConnectionTimeout if nobody answers."""
        if self._stop.is_set():
            raise RuntimeError("this client was closed; make a new Client")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dreamflow-client-io", daemon=True)
            self._thread.start()
        # The protocol package's version: a server sends newer optional capabilities only to clients that know them.
        from . import __version__

        reply = self.request(Message("hello", {"client": self.name[:128], "client_version": __version__}), timeout)
        self.capabilities = reply.fields
        return reply.fields

    def close(self) -> None:
        """Stop the I/O thread and close the socket; requests still waiting fail at once (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._bell.ring()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._bell.close()
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.reply = Message("error", {"message": "the client was closed", "code": "closed"})
            pending.done.set()

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while the server answers heartbeats."""
        return self._connected.is_set()

    @property
    def server_id(self) -> str | None:
        """The id of the server process last heard from (changes when it restarts)."""
        return self._server_id

    # ------------------------------------------------------------------------------- requests

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its reply; raises RequestError/ServerBusy/ConnectionTimeout."""
        if self._thread is None:
            raise RuntimeError("call connect() first" if not self._stop.is_set() else "this client was closed")
        timeout = self.timeout if timeout is None else timeout
        frames = encode(msg, self.limits)
        pending = _Pending(subscribe_on_accept=msg.type == "submit" and msg.fields.get("subscribe", True))
        with self._lock:
            self._pending[msg.id] = pending
        self._outbox.put((frames, msg, time.monotonic() + timeout))
        self._bell.ring()
        try:
            if not pending.done.wait(timeout):
                raise ConnectionTimeout(f"no DreamFlow server answered at {self.endpoint} within {timeout:g} s; "
                                        f"start one with `dreamflow serve`")
        finally:
            with self._lock:
                self._pending.pop(msg.id, None)
        reply = pending.reply
        assert reply is not None
        if reply.type == "error":
            raise RequestError(reply.fields["message"], reply.fields["code"])
        if reply.type == "busy":
            raise ServerBusy(reply.fields["message"], "busy")
        return reply

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one ping, in seconds."""
        start = time.perf_counter()
        self.request(Message("ping", {"t": time.time()}), timeout)
        return time.perf_counter() - start

    def submit(self, prompt: str, *, negative_prompt: str | None = None, seed: int | None = None, method: str | None = None,
               preset: str | None = None, overrides: Mapping[str, Any] | None = None,
               mesh: Mapping[str, np.ndarray] | None = None, start_stage: str | None = None, start_t: float | None = None,
               object_id: str | None = None, subscribe: bool = True, timeout: float | None = None) -> str:
        """Submit a job; its id. With ``subscribe`` its events arrive in :meth:`poll_events` from sequence 0."""
        fields: dict[str, Any] = {"prompt": prompt, "subscribe": subscribe}
        for key, value in (("negative_prompt", negative_prompt), ("seed", seed), ("method", method), ("preset", preset),
                           ("start_stage", start_stage), ("start_t", start_t)):
            if value is not None:
                fields[key] = value
        if overrides:
            fields["overrides"] = dict(overrides)
        if object_id is not None:
            fields["object_id"] = object_id
        reply = self.request(Message("submit", fields, dict(mesh or {})), timeout)
        return str(reply.job)

    def cancel(self, job: str, reason: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server to stop a job; the job's summary (its ``cancelled`` event follows)."""
        reply = self.request(Message("cancel", {"reason": reason} if reason else {}, job=job), timeout)
        return reply.fields.get("job_status", {})

    def subscribe(self, job: str, from_seq: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Receive a job's events from ``from_seq`` (default: after the last one seen, else 0)."""
        if from_seq is None:
            with self._lock:
                from_seq = self._last_seq.get(job, -1) + 1
        fields = self.request(Message("subscribe", {"from_seq": from_seq}, job=job), timeout).fields
        if fields["next_seq"] < from_seq:
            raise RequestError(_seq_mismatch_text(job, from_seq, fields["next_seq"]), "seq_mismatch")
        return fields

    def unsubscribe(self, job: str, timeout: float | None = None) -> None:
        """Stop receiving a job's events."""
        with self._lock:
            self._subs.pop(job, None)
        self.request(Message("unsubscribe", job=job), timeout)

    def status(self, job: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """One job's summary, or the server's summary when ``job`` is None."""
        reply = self.request(Message("status", job=job), timeout)
        return reply.fields.get("job_status" if job else "server", {})

    def list_jobs(self, limit: int = 100, state: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        """Summaries of the server's jobs, newest first."""
        fields: dict[str, Any] = {"limit": limit}
        if state:
            fields["state"] = state
        return self.request(Message("list_jobs", fields), timeout).fields["jobs"]

    def fetch(self, job: str, names: list[str] | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
        """A finished job's result files as uint8 arrays by file name."""
        reply = self.request(Message("fetch", {"names": names} if names else {}, job=job), timeout)
        return dict(reply.arrays)

    # -------------------------------------------------------------------------------- events

    def poll_events(self, limit: int | None = None) -> list[Message]:
        """Received events not yet taken, oldest first, without waiting (call from a UI timer)."""
        out: list[Message] = []
        while limit is None or len(out) < limit:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                break
        return out

    def next_event(self, timeout: float | None = None) -> Message | None:
        """The next event, waiting up to ``timeout`` seconds; None if none came."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def last_seq(self, job: str) -> int | None:
        """The last sequence number delivered for ``job`` (None if none)."""
        with self._lock:
            seq = self._last_seq.get(job, -1)
        return None if seq < 0 else seq

    # ------------------------------------------------------------------------------ I/O thread

    def _make_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # Queue nothing for a server that is not there: a request that timed out must not be
        # delivered later to a server started meanwhile (a ghost job); unsent requests are
        # retried by the I/O thread until their own deadline instead.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes + self.limits.max_header_bytes)
        ivl = max(100, int(self.heartbeat * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        if self._keys is not None:
            sock.curve_serverkey = self._keys.server_public
            sock.curve_publickey = self._keys.client_public
            sock.curve_secretkey = self._keys.client_secret
        sock.connect(self.endpoint)
        return sock

    def _run(self) -> None:
        sock = self._make_socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._bell.fileno(), zmq.POLLIN)
        last_recv = last_ping = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = max(0.0, min(last_ping + self.heartbeat - now, 0.02 if self._unsent else 0.5))
                ready = dict(poller.poll(int(wait * 1000)))
                if self._bell.fileno() in ready:
                    self._bell.drain()
                self._flush_outbox(sock)
                if sock in ready:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        last_recv = time.monotonic()
                        self._on_frames(sock, frames)
                now = time.monotonic()
                if now - last_ping >= self.heartbeat:
                    last_ping = now
                    self._send(sock, Message("ping", {"t": time.time()}))
                if self._connected.is_set() and now - last_recv > 3 * self.heartbeat:
                    self._connected.clear()  # silence: resubscribe when the server answers again
        finally:
            sock.close(linger=0)

    def _send(self, sock: zmq.Socket, msg: Message, frames: list[Any] | None = None, deadline: float | None = None) -> None:
        """Send now, or keep the message for retries until ``deadline`` while there is no connection."""
        if deadline is not None and time.monotonic() >= deadline:
            return  # its caller has given up: never deliver it late
        frames = frames if frames is not None else encode(msg, self.limits)
        try:
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            if deadline is None:
                deadline = time.monotonic() + (self.timeout if msg.type == "subscribe" else 0.0)
            if time.monotonic() < deadline:
                self._unsent.append((frames, msg, deadline))
            return  # else dropped: a heartbeat, or a request whose caller has already timed out
        if msg.type == "subscribe":
            with self._lock:
                self._subs[str(msg.job)] = msg.fields.get("from_seq", 0) - 1

    def _flush_outbox(self, sock: zmq.Socket) -> None:
        retry, self._unsent = self._unsent, []
        for frames, msg, deadline in retry:
            self._send(sock, msg, frames, deadline)
        while True:
            try:
                frames, msg, deadline = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(sock, msg, frames, deadline)

    def _resubscribe(self, sock: zmq.Socket, jobs: list[str] | None = None) -> None:
        with self._lock:
            todo = {j: s for j, s in self._subs.items() if jobs is None or j in jobs}
        for job, last in todo.items():
            self._send(sock, Message("subscribe", {"from_seq": last + 1}, job=job))

    def _on_frames(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            msg = decode(frames, self.limits)
        except ProtocolError as exc:
            self.dropped = [*self.dropped[-99:], str(exc)]  # the last 100, for diagnosis
            return
        if msg.type in ("pong", "capabilities"):
            server_id = msg.fields["server_id"]
            restarted = self._server_id is not None and server_id != self._server_id
            self._server_id = server_id
            if restarted or not self._connected.is_set():
                self._connected.set()
                self._resubscribe(sock)
        elif not self._connected.is_set():
            self._connected.set()
        if msg.type == "subscribed" and msg.fields["next_seq"] < msg.fields["from_seq"]:
            self._on_seq_mismatch(msg)
        if msg.parent is not None:
            with self._lock:
                pending = self._pending.get(msg.parent)
            if pending is not None:
                if msg.type == "accepted" and pending.subscribe_on_accept:
                    with self._lock:
                        self._subs[str(msg.job)] = -1
                pending.reply = msg
                pending.done.set()
                return
            if msg.type in ("pong", "subscribed"):
                return  # answers to the I/O thread's own heartbeats and resubscriptions
        if msg.job is not None and msg.seq is not None:
            self._on_event(sock, msg)
        else:
            self._events.put(msg)

    def _on_seq_mismatch(self, msg: Message) -> None:
        """The server's log of a job ends before events this client already has: say so, never wait for them."""
        job = str(msg.job)
        with self._lock:
            self._subs.pop(job, None)
        text = _seq_mismatch_text(job, msg.fields["from_seq"], msg.fields["next_seq"])
        self._events.put(Message("error", {"message": text[:4096], "code": "seq_mismatch"}, job=job))

    def _on_event(self, sock: zmq.Socket, msg: Message) -> None:
        job, seq = str(msg.job), int(msg.seq or 0)
        with self._lock:
            last = self._subs.get(job)
        if last is None or seq <= last:
            return  # not subscribed, or a duplicate from an overlapping replay
        if seq > last + 1:
            # A gap (messages lost while the link was down): ask again from the first missing
            # event, once per second at most, since every later live event shows the same gap.
            now = time.monotonic()
            if now - self._gap_asked.get(job, -1e9) > 1.0:
                self._gap_asked[job] = now
                self._resubscribe(sock, [job])
            return
        self._gap_asked.pop(job, None)
        with self._lock:
            self._last_seq[job] = seq
            if msg.type in TERMINAL_TYPES:
                self._subs.pop(job, None)
            else:
                self._subs[job] = seq
        self._events.put(msg)


def _seq_mismatch_text(job: str, from_seq: int, next_seq: int) -> str:
    return (f"job {job}: asked for events from seq {from_seq}, but the server's log ends before it (next_seq {next_seq}); "
            f"the server lost events this client already received (its store was damaged or replaced), so the stream "
            f"cannot continue from here")
