"""The add-on's connection to a backend: everything here runs OFF Blender's main thread or is
thread-safe, and nothing here imports ``bpy``.

Three threads work for a :class:`Session`:

- the protocol ``Client``'s socket thread (``dreamflow_protocol.Client``): owns the ZeroMQ
  DEALER socket, heartbeats, reconnects and resubscribes from the last sequence number, and
  queues every received job event;
- a preparation thread: takes those events as they arrive and does the numpy half of an import
  (``meshprep``: checks, edges, per-corner UVs, float pixels), queuing each as a :class:`Ready`;
- a request worker: runs the blocking requests (connect, submit, cancel, subscribe) so an
  operator returns at once even when the backend is slow or gone; each request's outcome is
  queued as an :class:`Outcome`.

The main thread takes the Ready and Outcome queues' contents in ``live.drain_and_apply`` and only
there touches Blender data. See that function for the other side of the boundary.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dreamflow_protocol import Client, ConnectionTimeout, CurveKeys, Message

from .meshprep import PreparedImage, PreparedMesh, prepare_image, prepare_mesh


@dataclass
class Outcome:
    """The result of one request run by the worker: ``error`` is a sentence, or empty on success."""

    kind: str                      # "connect", "submit", "cancel", "subscribe"
    value: Any = None
    error: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    unreachable: bool = False      # it failed because no backend answered (passes once one does)


@dataclass
class Ready:
    """A received job event with its arrays prepared for Blender (or why they could not be)."""

    msg: Message
    prepared: PreparedMesh | PreparedImage | None = None
    error: str = ""


def prepare_event(msg: Message) -> Ready:
    """Prepare a mesh or preview event's arrays; other events pass through."""
    try:
        if msg.type == "mesh":
            return Ready(msg, prepare_mesh(msg.arrays))
        if msg.type == "preview":
            return Ready(msg, prepare_image(msg.arrays.get("image"), "preview image"))
    except Exception as exc:  # reported on the main thread, with the job it belongs to
        return Ready(msg, None, str(exc) or type(exc).__name__)
    return Ready(msg)


def load_curve_keys(server_public_file: str, client_secret_file: str) -> CurveKeys:
    """CURVE keys from a server public key file and this client's secret key file (zmq.auth format)."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_public_file)
    client_public, client_secret = zmq.auth.load_certificate(client_secret_file)
    if client_secret is None:
        raise ValueError(f"{client_secret_file} holds no secret key (pick the .key_secret file)")
    return CurveKeys(server_public, client_public, client_secret)


def describe_error(exc: BaseException) -> str:
    """A one-line message an artist can act on."""
    text = str(exc).strip() or type(exc).__name__
    if type(exc).__name__ == "ServerBusy":
        return f"The backend is busy: {text}"
    if type(exc).__name__ == "RequestError":
        return f"The backend refused the request: {text}"
    return text


class Session:
    """One backend connection with its request worker; safe to use from Blender's main thread."""

    def __init__(self, endpoint: str, *, keys: CurveKeys | None = None, timeout: float = 5.0,
                 heartbeat: float = 1.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.client = Client(endpoint, timeout=timeout, heartbeat=heartbeat, keys=keys, name="dreamflow-blender")
        self._tasks: queue.Queue[tuple[str, Callable[[], Any], dict[str, Any]] | None] = queue.Queue()
        self._outcomes: queue.Queue[Outcome] = queue.Queue()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._ready: queue.Queue[Ready] = queue.Queue()
        self._closing = threading.Event()
        self._worker = threading.Thread(target=self._work, name="dreamflow-blender-requests", daemon=True)
        self._worker.start()
        self._preparer = threading.Thread(target=self._prepare, name="dreamflow-blender-prepare", daemon=True)
        self._preparer.start()
        self.ever_connected = False
        self.connect_error = ""
        self.connect_started = 0.0
        self._dropped_seen: list[str] = []

    # --------------------------------------------------------------------------- requests

    def _enqueue(self, kind: str, fn: Callable[[], Any], context: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._in_flight += 1
        self._tasks.put((kind, fn, dict(context or {})))

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            kind, fn, context = task
            try:
                outcome = Outcome(kind, fn(), "", context)
            except Exception as exc:  # every failure becomes a message for the panel
                outcome = Outcome(kind, None, describe_error(exc), context, isinstance(exc, ConnectionTimeout))
            if kind == "connect":
                self.connect_error = outcome.error
                if not outcome.error:
                    self.ever_connected = True
            self._outcomes.put(outcome)
            with self._lock:
                self._in_flight -= 1

    def _prepare(self) -> None:
        while not self._closing.is_set():
            msg = self.client.next_event(timeout=0.1)
            if msg is not None:
                self._ready.put(prepare_event(msg))

    def _ensure_connected(self) -> None:
        """Hello/capabilities once per session (and again after a failed attempt)."""
        if self.client.capabilities is None or not self.client.connected:
            self.client.connect(self.timeout)
            self.ever_connected = True
            self.connect_error = ""

    def connect(self) -> None:
        """Say hello to the backend in the background; the outcome carries its capabilities."""
        self.connect_started = time.monotonic()
        self._enqueue("connect", lambda: (self.client.connect(self.timeout), self.client.capabilities)[1])

    def submit(self, context: dict[str, Any], **kwargs: Any) -> None:
        """Submit a job in the background; the outcome's value is the job id."""
        def run() -> str:
            self._ensure_connected()
            return self.client.submit(timeout=self.timeout, **kwargs)
        self._enqueue("submit", run, context)

    def cancel(self, job: str) -> None:
        """Ask the backend to stop ``job`` in the background."""
        def run() -> Any:
            self._ensure_connected()
            return self.client.cancel(job, "cancelled from Blender", timeout=self.timeout)
        self._enqueue("cancel", run, {"job": job})

    def subscribe(self, job: str, from_seq: int) -> None:
        """Receive ``job``'s events from ``from_seq`` on (reattach); the outcome carries its state."""
        def run() -> Any:
            self._ensure_connected()
            return self.client.subscribe(job, from_seq, timeout=self.timeout)
        self._enqueue("subscribe", run, {"job": job, "from_seq": from_seq})

    # ----------------------------------------------------------------------- main thread side

    def poll_outcomes(self) -> list[Outcome]:
        """Finished requests, oldest first, without waiting."""
        out = []
        while True:
            try:
                out.append(self._outcomes.get_nowait())
            except queue.Empty:
                return out

    def poll_events(self, limit: int) -> list[Ready]:
        """Received, prepared job events, oldest first, without waiting."""
        out: list[Ready] = []
        while len(out) < limit:
            try:
                out.append(self._ready.get_nowait())
            except queue.Empty:
                break
        return out

    def pending(self) -> list[str]:
        """Types of the prepared events waiting for the main thread (diagnostics and tests)."""
        return [r.msg.type for r in list(self._ready.queue)]

    def new_malformed(self) -> list[str]:
        """Descriptions of malformed messages received since the last call.

        The client keeps only its last 100 (``Client.dropped``), so the new ones are found as the
        shortest tail that, appended to what was seen before, gives the client's list again.
        """
        current = list(self.client.dropped)
        seen = self._dropped_seen
        fresh = current
        if current != seen:
            for n in range(1, len(current) + 1):
                if (seen + current[-n:])[-len(current):] == current:
                    fresh = current[-n:]
                    break
        else:
            fresh = []
        self._dropped_seen = current
        return fresh

    @property
    def busy(self) -> bool:
        """True while requests are queued or running."""
        with self._lock:
            return self._in_flight > 0

    @property
    def connected(self) -> bool:
        """True while the backend answers heartbeats."""
        return self.client.connected

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (tests and shutdown only); True if idle in time."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.busy

    def close(self) -> None:
        """Stop the socket thread and the worker; never blocks Blender for long.

        A request still waiting for its reply ends with its own timeout on the (daemon) worker
        thread; its outcome is dropped with this session.
        """
        self._closing.set()
        self._tasks.put(None)
        self._preparer.join(timeout=1.0)
        self.client.close()
        self._worker.join(timeout=0.5)
