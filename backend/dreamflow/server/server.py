"""The job server: one ROUTER socket served by one thread, jobs computed by a worker thread.

Thread design, and why. The socket thread owns the ROUTER socket and does everything that talks
to clients: it answers requests, and it publishes job events to subscribers. The worker thread
runs the pipeline; it stores each event in the job's log and hands it to the socket thread
through a ``queue.Queue`` plus a doorbell (a local socket pair the socket thread polls next to the
ROUTER). A queue rather than an inproc ZeroMQ pair because events carry numpy arrays that should
cross threads as objects, without serialising them twice; the doorbell wakes the poll at once,
so neither side waits on a timeout. Nothing the socket thread does per message takes long (it
never computes; replays to slow or late subscribers are pumped a few events per loop turn), so a
ping or a cancel is answered within milliseconds while a job computes.

Delivery: each (client, job) subscription has a cursor, the next seq that client should get. A
live event goes straight to subscribers whose cursor equals its seq; subscribers that are behind
(they subscribed from an old seq, or their send queue was full) are fed from the job's log on
disk until they catch up. With ROUTER_MANDATORY a full client queue is noticed (not silently
dropped) and retried, so no subscriber ever misses an event. Subscriptions are indexed
(``subscriptions.py``) so a loop turn costs what the active ones cost, and those of peers silent
for ``peer_timeout`` seconds expire.

Memory: large messages queued for sending are counted until ZeroMQ has let go of them; past
``max_queued_bytes`` (across all peers) events wait on disk and a large reply is answered with an
``overloaded`` error. A reply ZeroMQ refuses because that peer's queue is full is owed: the peer
gets a ``reply_dropped`` error naming the request as soon as it has room.

Submits: the socket thread checks a submit's header and sizes, then hands it to the intake
thread, which checks its contents (NaN, face indices), the spec (ranges, the operator's caps,
client-chosen paths) and writes its input arrays with fsync; the answer goes back through the
socket thread. So a 256 MiB upload never holds up a ping.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import zmq

from dreamflow_protocol import (DEFAULT_LIMITS, METHODS, PROTOCOL_VERSION, START_STAGES, Limits, Message, ProtocolError, decode,
                                encode, new_id, validate_message)
from dreamflow_protocol.codec import check_contents
from dreamflow_protocol.endpoints import is_local_endpoint
from dreamflow_protocol.schema import REQUEST_TYPES, capabilities_for
from dreamflow_protocol.wake import Doorbell

from .. import __version__
from ..config import ConfigError
from .admission import Admission
from .store import ACTIVE_STATES, TERMINAL_STATES, JobRecord, JobStore, StoreError
from .runners import JobRunner, JobRunnerFactory
from .subscriptions import Key, Sub, Subscriptions
from .worker import Runner, Worker

log = logging.getLogger("dreamflow.server")

#: A job's state after each terminal event.
TERMINAL_EVENT_STATES = {"job_done": "done", "cancelled": "cancelled", "error": "failed"}
#: Events replayed from disk per subscriber per loop turn (keeps the loop responsive).
_PUMP_BATCH = 16
#: Seconds between retention sweeps when no job finishes (keep_days applies to idle servers too).
_PRUNE_EVERY = 600.0
#: Messages at least this large are counted against max_queued_bytes until ZeroMQ lets go of them.
_TRACK_BYTES = 64 * 1024
#: Dropped replies remembered per peer (answered with reply_dropped once it has room).
_MAX_OWED = 32


class ServerConfigError(RuntimeError):
    """The server cannot start with these settings (the reason in words)."""


def transport_cap(limits: Limits) -> int:
    """The largest single frame ZeroMQ accepts before it drops the connection."""
    return max(2 * limits.max_frame_bytes, limits.max_frame_bytes + 1024 * 1024)


class Server:
    """A DreamFlow job server on one endpoint with one job store."""

    def __init__(self, store: str | Path, bind: str = "tcp://127.0.0.1:5555", *, max_queue: int = 8,
                 runner: Runner | None = None, limits: Limits = DEFAULT_LIMITS, keys: str | Path | None = None,
                 context: zmq.Context | None = None, keep_jobs: int | None = None, keep_days: float | None = None,
                 models_dirs: Iterable[str | Path] = (), max_steps: int | None = None, max_resolution: int | None = None,
                 peer_timeout: float = 120.0, max_queued_bytes: int = 512 * 1024 * 1024,
                 job_runner: JobRunnerFactory | None = None) -> None:
        if not is_local_endpoint(bind) and keys is None:
            raise ServerConfigError(f"refusing to bind {bind}: it is reachable from other machines, and remote use needs "
                                    f"authentication; make keys with `dreamflow keys --out DIR` and pass --keys DIR")
        if keep_jobs is not None and keep_jobs < 1:
            raise ServerConfigError(f"keep_jobs must be at least 1 (got {keep_jobs}); use None to keep every job")
        if keep_days is not None and not keep_days > 0:
            raise ServerConfigError(f"keep_days must be positive (got {keep_days}); use None to keep jobs of any age")
        for name, value in (("max_steps", max_steps), ("max_resolution", max_resolution)):
            if value is not None and value < 1:
                raise ServerConfigError(f"{name} must be at least 1 (got {value})")
        if not peer_timeout > 0 or max_queued_bytes < 1:
            raise ServerConfigError("peer_timeout and max_queued_bytes must be positive")
        dirs = tuple(Path(d) for d in models_dirs)
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise ServerConfigError(f"--models-dir {missing[0]} is not a folder")
        caps = {k: v for k, v in (("steps", max_steps), ("resolution", max_resolution)) if v is not None}
        self.admission = Admission(dirs, caps)
        self.peer_timeout = peer_timeout
        self.max_queued_bytes = max_queued_bytes
        self.keep_jobs, self.keep_days = keep_jobs, keep_days
        self._pruned_at = 0.0
        self._prune_wanted = False
        try:
            self.store = JobStore(store)
        except StoreError as exc:  # an unusable --store: the operator's to fix, said before anything starts
            raise ServerConfigError(str(exc)) from None
        self.limits = limits
        self.max_queue = max_queue
        self.server_id = new_id()
        self._context = context or zmq.Context.instance()
        self._keys = Path(keys) if keys is not None else None
        self._auth: Any = None
        self._bind = bind
        self._events: queue.Queue[tuple[JobRecord, Message]] = queue.Queue()
        self._bell = Doorbell()
        self._subs = Subscriptions()
        self._queued_bytes = 0
        self._in_flight: collections.deque[tuple[Any, int]] = collections.deque()  # (zmq tracker, bytes)
        self._owed: dict[bytes, list[tuple[str | None, str]]] = {}  # peer -> (request id, type) of dropped replies
        self._intake = ThreadPoolExecutor(1, thread_name_prefix="dreamflow-intake")
        self._intake_busy = 0  # submits handed to the intake thread and not yet answered
        self._intake_admitting = 0  # of those, the ones that will be queued if they pass
        self._admitted: queue.Queue[tuple[bytes, Message, Message, bool]] = queue.Queue()
        self._stop = False
        self._started = time.time()
        # Where jobs run (runners.py): this process's worker thread, or a cluster (``--ray``).
        self.worker: JobRunner = job_runner(self.store, self._publish) if job_runner else Worker(self.store, self._publish, runner)
        self.endpoint: str | None = None
        self._sock: zmq.Socket | None = None
        self._capabilities: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------- life

    def open(self) -> str:
        """Bind the socket, re-queue unfinished jobs, start the worker; the bound endpoint."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Transport-level cap, above the protocol's own per-frame check: frames somewhat over the
        # limit get an error reply that names the limit; a peer sending far more than that is
        # disconnected by ZeroMQ before the memory is spent.
        sock.setsockopt(zmq.MAXMSGSIZE, transport_cap(self.limits))
        sock.setsockopt(zmq.SNDHWM, 1000)
        # ZMTP heartbeats: a peer whose machine vanished (no FIN) is disconnected, so sends to it fail fast.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 10_000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
        if self._keys is not None:
            self._setup_curve(sock)
        try:
            sock.bind(self._bind)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        for repair in self.store.repairs:
            log.warning("store: %s", repair)
        self._requeue_unfinished()
        self._prune()
        self.capabilities()  # imports torch and the pipeline now, not while the first client waits
        self._intake.submit(lambda: None).result()  # its thread starts now, not while a submit waits
        self.worker.start()
        log.info("DreamFlow server %s listening on %s (store %s, auth %s)", self.server_id[:8], self.endpoint,
                 self.store.root, "curve" if self._keys else "none")
        return self.endpoint

    def _setup_curve(self, sock: zmq.Socket) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        from dreamflow_protocol.keys import load_server_secret

        assert self._keys is not None
        authorized = self._keys / "authorized"
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise ServerConfigError(f"{authorized} holds no client public keys (*.key); no client could connect")
        public, secret = load_server_secret(self._keys)
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(authorized))
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    def _requeue_unfinished(self) -> None:
        for job in self.store.all():
            state = job.state.get("state")
            try:
                last = job.read_event(job.next_seq - 1) if job.next_seq else None
            except StoreError as exc:
                log.error("store: %s", exc)
                last = None
            if state in TERMINAL_STATES and (last is None or last.type not in TERMINAL_EVENT_STATES):
                self._restore_terminal_event(job, state)
            elif state in ACTIVE_STATES and last is not None and last.type in TERMINAL_EVENT_STATES:
                # It finished, but the server died before recording that in state.json.
                job.save_state(state=TERMINAL_EVENT_STATES[last.type], finished=time.time())
            elif state == "cancelling":
                self._finish_unstarted(job, "cancelled before the server restarted")
            elif state in ("queued", "running"):
                self.worker.enqueue(job.job_id)

    def _restore_terminal_event(self, job: JobRecord, state: str) -> None:
        """Re-append the end of a finished job's stream, lost in a torn write, from its state.json."""
        if state == "done":
            msg = Message("job_done", {"files": list(job.state.get("files", []))}, job=job.job_id, seq=0)
        elif state == "failed":
            msg = Message("error", {"message": str(job.state.get("error") or "the job failed")[:4096], "code": "job_failed"},
                          job=job.job_id, seq=0)
        else:
            msg = Message("cancelled", {"reason": "cancelled"}, job=job.job_id, seq=0)
        validate_message(msg)
        job.append_event(msg)
        log.warning("store: job %s: its %s event was lost in a torn write; restored from state.json", job.job_id, msg.type)

    def serve_forever(self) -> None:
        """Run the socket loop in this thread until :meth:`stop` (from any thread) or Ctrl-C."""
        if self._sock is None:
            self.open()
        assert self._sock is not None
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._bell.fileno(), zmq.POLLIN)
        try:
            while not self._stop:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self._bell.fileno() in ready:
                    self._bell.drain()
                if sock in ready:
                    self._read_requests(sock)
                self._settle_sent()
                self._answer_admitted(sock)
                self._broadcast(sock)
                self._pump(sock)
                self._pay_owed(sock)
                for peer, dropped in self._subs.expire(time.monotonic(), self.peer_timeout):
                    log.info("expired %d subscription(s) of a peer silent for over %g s", dropped, self.peer_timeout)
                if self._prune_wanted or time.monotonic() - self._pruned_at > _PRUNE_EVERY:
                    self._prune_wanted = False
                    self._prune()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the socket loop to end (thread-safe)."""
        self._stop = True
        self._bell.ring()

    def _shutdown(self) -> None:
        self._intake.shutdown(wait=True, cancel_futures=True)
        self.worker.stop()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
        self._bell.close()
        log.info("DreamFlow server stopped")

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        waits = [1.0]
        for key in self._subs.waiting:
            sub = self._subs.get(key)
            if sub is not None:
                waits.append(sub.blocked_until - now)
        if self._owed or self._in_flight:
            waits.append(0.01)
        return max(0, int(min(waits) * 1000))

    # ------------------------------------------------------------------------- requests

    def _read_requests(self, sock: zmq.Socket) -> None:
        for _ in range(256):  # bounded, so event delivery keeps flowing under a flood of requests
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # a peer sent nothing but its identity
            peer = frames[0].bytes
            self._subs.heard(peer, time.monotonic())
            msg: Message | None = None
            try:
                msg = decode(frames[1:], self.limits, contents=False)  # a submit's contents: on the intake thread
                if msg.type not in REQUEST_TYPES:
                    raise ProtocolError(f"{msg.type} is a message a server sends, not a request", parent=msg.id,
                                        code="not_a_request")
                if msg.type != "submit":
                    check_contents(msg)
                self._handle(sock, peer, msg)
            except ProtocolError as exc:
                self._send_error(sock, peer, str(exc), exc.code, exc.parent)
            except (StoreError, ConfigError) as exc:
                self._send_error(sock, peer, str(exc), getattr(exc, "code", "bad_request"),
                                 msg.id if msg is not None else None)
            except Exception as exc:  # a bug in a handler must not take the server down
                log.exception("error while handling a request")
                self._send_error(sock, peer, f"internal error: {type(exc).__name__}: {exc}", "internal",
                                 msg.id if msg is not None else None)
            # Let go of the frames now: a big submit's memory is then freed by the intake thread, not here.
            del frames, msg

    def _handle(self, sock: zmq.Socket, peer: bytes, msg: Message) -> None:
        # REQUEST_TYPES was checked by the caller, and each request type has one _on_<type> method.
        handler = getattr(self, f"_on_{msg.type}")
        reply = handler(sock, peer, msg)
        if reply is not None:
            self._send_reply(sock, peer, reply, msg)

    def _on_ping(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        fields = {"server_time": time.time(), "server_id": self.server_id}
        if "t" in msg.fields:
            fields["t"] = msg.fields["t"]
        return msg.reply("pong", fields)

    def _on_hello(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        return msg.reply("capabilities", capabilities_for(self.capabilities(), msg.fields.get("client_version")))

    def capabilities(self) -> dict[str, Any]:
        """What this server offers (the capabilities message's fields, the newest protocol's)."""
        from .presets import preset_details

        # Read at each hello: weights fetched while the server runs make their preset runnable.
        return {**self._static_capabilities(), "preset_details": preset_details(runner_facts=self.worker.describe())}

    def _static_capabilities(self) -> dict[str, Any]:
        if self._capabilities is None:
            import torch

            from .. import accel
            from ..pipeline.config import PRESETS

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            self._capabilities = {
                "protocol": PROTOCOL_VERSION, "server_version": __version__, "server_id": self.server_id, "device": device,
                "accelerators": {k: bool(v) for k, v in accel.report().items()}, "presets": list(PRESETS),
                "methods": list(METHODS), "start_stages": list(START_STAGES),
                "limits": {**self.limits.as_dict(), "peer_timeout_s": int(self.peer_timeout), **{
                    f"max_{k}": v for k, v in self.admission.caps.items()}},
                "max_queue": self.max_queue, "auth": "curve" if self._keys else "none"}
        return dict(self._capabilities)

    def _on_submit(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message | None:
        if self._intake_busy >= 2 * self.max_queue + 4:  # a flood: do not hold more uploads in memory
            return self._busy(msg, len(self.worker.queued()) + self._intake_admitting)
        waiting = len(self.worker.queued()) + self._intake_admitting  # those being taken in will wait too
        full = waiting >= self.max_queue  # still checked in full: a bad submit gets its error, not busy
        self._intake_busy += 1
        self._intake_admitting += not full
        self._intake.submit(self._admit, peer, msg, waiting if full else None)
        return None  # answered by _answer_admitted once the intake thread is done

    def _busy(self, msg: Message, waiting: int) -> Message:
        return msg.reply("busy", {"message": f"the server's queue is full ({waiting} jobs waiting, limit {self.max_queue}); "
                                             f"try again when a job has finished", "queued": waiting, "max_queue": self.max_queue})

    def _admit(self, peer: bytes, msg: Message, full: int | None) -> None:
        """Intake thread: check a submit in full and store it (busy if ``full``); the answer goes back to the socket thread."""
        try:
            reply = self._admit_checked(msg, full)
        except ProtocolError as exc:
            reply = Message("error", {"message": str(exc)[:4096], "code": exc.code[:32]}, parent=msg.id)
        except (StoreError, ConfigError) as exc:
            reply = Message("error", {"message": str(exc)[:4096], "code": getattr(exc, "code", "bad_request")}, parent=msg.id)
        except Exception as exc:  # a full disk, a bug: answered, and the server goes on
            log.exception("error while taking in a submit")
            reply = Message("error", {"message": f"internal error: {type(exc).__name__}: {exc}"[:4096], "code": "internal"},
                            parent=msg.id)
        # The request itself stays here: its arrays are freed on this thread, not on the socket thread.
        request = Message(msg.type, {"subscribe": msg.fields.get("subscribe", True)}, id=msg.id)
        del msg
        self._admitted.put((peer, request, reply, full is None))
        self._bell.ring()

    def _admit_checked(self, msg: Message, full: int | None) -> Message:
        from ..pipeline.config import build_config

        check_contents(msg)  # NaN/inf and face indices of an input mesh
        f = msg.fields
        spec = {k: f[k] for k in ("prompt", "negative_prompt", "seed", "method", "preset", "overrides", "start_stage",
                                   "start_t", "object_id") if k in f}
        spec.setdefault("preset", "preview")
        spec.setdefault("method", "apfo")
        # Check the spec now, so a typo is an error reply, not a failed job minutes later.
        config = build_config(spec["preset"], spec.get("overrides") or {}, prompt=spec["prompt"],
                              negative_prompt=spec.get("negative_prompt"), seed=spec.get("seed"), method=spec.get("method"))
        self.admission.check(config)  # the operator's caps and the paths a client may name
        if full is not None:
            return self._busy(msg, full)
        waiting = len(self.worker.queued())
        asked, spec["prompt"] = spec["prompt"], config.prompt  # the job runs (and lists) the prompt it was read as
        job = self.store.create(spec, dict(msg.arrays))  # input arrays written with fsync, here, not on the socket thread
        if config.prompt != asked:
            # The job's first event, so every client (of any version) and every replay says it.
            job.append_event(Message("log", {"level": "info", "message": f"using {config.prompt!r} (the toy world's words "
                                                                         f"for {asked!r})"[:4096]}, job=job.job_id, seq=0))
        return msg.reply("accepted", {"position": waiting, "state": "queued"}, job=job.job_id)

    def _answer_admitted(self, sock: zmq.Socket) -> None:
        while True:
            try:
                peer, msg, reply, admitting = self._admitted.get_nowait()
            except queue.Empty:
                return
            self._intake_busy -= 1
            self._intake_admitting -= admitting
            job = self.store.get(str(reply.job)) if reply.type == "accepted" else None
            self._send_reply(sock, peer, reply, msg)
            if job is None:
                continue
            # Subscribed and queued only now, after its accepted reply: no event can come before it.
            if msg.fields.get("subscribe", True):
                self._subs.add(peer, job.job_id, 0, behind=job.next_seq > 0)  # behind: admission logged an event
            self.worker.enqueue(job.job_id)
            log.info("job %s queued (preset %s, method %s)", job.job_id, job.spec.get("preset"), job.spec.get("method"))

    def _on_cancel(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        job = self.store.get(str(msg.job))
        reason = msg.fields.get("reason") or "cancelled by a client"
        state = job.state.get("state")
        if state in ACTIVE_STATES:
            if self.worker.remove(job.job_id):
                self._finish_unstarted(job, reason)
            elif self.worker.cancel_running(job.job_id, reason):
                # Only if the worker has not already recorded the end (it may be that quick).
                job.transition("cancelling", allowed_from=("running",))
        return msg.reply("status_reply", {"job_status": job.summary()})

    def _finish_unstarted(self, job: JobRecord, reason: str) -> None:
        self._publish(job, job.append_event(Message("cancelled", {"reason": reason[:256]}, job=job.job_id, seq=0)))
        job.save_state(state="cancelled", finished=time.time())

    def _on_status(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        if msg.job is not None:
            job = self.store.get(msg.job)
            summary = job.summary()
            queued = self.worker.queued()
            if job.job_id in queued:
                summary["position"] = queued.index(job.job_id)
            return msg.reply("status_reply", {"job_status": summary})
        jobs = self.store.all()
        running = self.worker.running()
        server = {"server_id": self.server_id, "version": __version__, "uptime": time.time() - self._started,
                  "queued": len(self.worker.queued()), "max_queue": self.max_queue,
                  "running": running[0] if running else None, "running_jobs": running, **self.worker.describe(), "jobs": len(jobs),
                  "states": {s: sum(1 for j in jobs if j.state.get("state") == s) for s in (*ACTIVE_STATES, *TERMINAL_STATES)}}
        return msg.reply("status_reply", {"server": server})

    def _on_list_jobs(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        jobs = [j for j in reversed(self.store.all()) if msg.fields.get("state") in (None, j.state.get("state"))]
        return msg.reply("jobs", {"jobs": [j.summary() for j in jobs[: msg.fields.get("limit", 100)]]})

    def _on_subscribe(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        job = self.store.get(str(msg.job))
        from_seq = msg.fields.get("from_seq", 0)
        self._subs.add(peer, job.job_id, from_seq, behind=from_seq < job.next_seq)
        return msg.reply("subscribed", {"from_seq": from_seq, "next_seq": job.next_seq, "state": job.state.get("state")})

    def _on_unsubscribe(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        job = self.store.get(str(msg.job))
        self._subs.remove((peer, job.job_id))
        return msg.reply("status_reply", {"job_status": job.summary()})

    def _on_fetch(self, sock: zmq.Socket, peer: bytes, msg: Message) -> Message:
        import numpy as np

        job = self.store.get(str(msg.job))
        if job.state.get("state") != "done":
            raise StoreError(f"job {job.job_id} has no results to fetch: it is {job.state.get('state')}")
        names = msg.fields.get("names") or list(job.state.get("files", []))
        arrays, total = {}, 0
        for name in names:
            with job.open_result(name) as fh:  # never through a link: what is served lies inside the job's out/
                size = os.fstat(fh.fileno()).st_size
                total += size
                if size > self.limits.max_frame_bytes or total > self.limits.max_message_bytes - self.limits.max_header_bytes:
                    raise StoreError(f"result {name!r} is too large to send in one message ({size} bytes); fetch fewer files")
                arrays[name] = np.frombuffer(fh.read(), dtype=np.uint8)
        return msg.reply("result", {"files": names}, arrays)

    # --------------------------------------------------------------------------- sending

    def _send(self, sock: zmq.Socket, peer: bytes, msg: Message) -> bool:
        """Send one message to a peer; False if its queue is full, it is gone, or the byte bound is reached."""
        return self._send_frames(sock, peer, encode(msg, self.limits, validate=False))

    def _send_reply(self, sock: zmq.Socket, peer: bytes, reply: Message, request: Message) -> None:
        """Send the answer to ``request``; if it cannot go now, the peer still gets an error naming the request."""
        frames = encode(reply, self.limits, validate=False)
        outcome = self._try_send(sock, peer, frames)
        if outcome == "bounded":
            mib, size = 1024 * 1024, _frames_bytes(frames)
            self._send_error(sock, peer, f"the server holds {self._queued_bytes / mib:.0f} MiB of messages not yet taken by "
                                         f"slow clients (its limit is {self.max_queued_bytes / mib:.0f} MiB); the {size / mib:.1f} "
                                         f"MiB reply to your {request.type} request was not sent: ask again shortly",
                             "overloaded", request.id, request.type)
        elif outcome == "full":
            self._owe(peer, request.id, request.type)

    def _send_error(self, sock: zmq.Socket, peer: bytes, text: str, code: str, parent: str | None,
                    request_type: str = "last") -> None:
        msg = Message("error", {"message": text[:4096], "code": code[:32]}, parent=parent)
        validate_message(msg)
        if self._try_send(sock, peer, encode(msg, self.limits, validate=False)) == "full":
            self._owe(peer, parent, request_type)

    def _owe(self, peer: bytes, parent: str | None, request_type: str) -> None:
        """Remember a reply ZeroMQ refused (the peer's queue was full), to be answered by a reply_dropped error."""
        owed = self._owed.setdefault(peer, [])
        if len(owed) < _MAX_OWED:
            owed.append((parent, request_type))

    def _pay_owed(self, sock: zmq.Socket) -> None:
        """Tell peers whose replies were dropped which requests to send again, as soon as they have room."""
        for peer in list(self._owed):
            owed = self._owed.get(peer, [])
            while owed:
                parent, mtype = owed[0]
                msg = Message("error", {"message": f"the reply to your {mtype} request was dropped because your connection's "
                                                   f"queue was full; send the request again", "code": "reply_dropped"},
                              parent=parent)
                if self._try_send(sock, peer, encode(msg, self.limits, validate=False)) != "sent":
                    break
                owed.pop(0)
            if not owed:
                self._owed.pop(peer, None)

    def _drop_peer(self, peer: bytes) -> None:
        self._subs.drop_peer(peer)
        self._owed.pop(peer, None)

    def _has_room(self, nbytes: int) -> bool:
        """Whether a large message fits the bound on queued bytes (one always fits when nothing is queued)."""
        return nbytes < _TRACK_BYTES or self._queued_bytes == 0 or self._queued_bytes + nbytes <= self.max_queued_bytes

    def _settle_sent(self) -> None:
        """Release the byte count of large messages ZeroMQ has finished with."""
        if not self._in_flight:
            return
        pending = collections.deque(item for item in self._in_flight if not item[0].done)
        self._queued_bytes = sum(n for _, n in pending)
        self._in_flight = pending

    # ---------------------------------------------------------------------------- events

    def _publish(self, job: JobRecord, msg: Message) -> None:
        """Called from any thread after ``msg`` is stored: hand it to the socket thread."""
        self._events.put((job, msg))
        self._bell.ring()

    def _broadcast(self, sock: zmq.Socket) -> None:
        while True:
            try:
                job, msg = self._events.get_nowait()
            except queue.Empty:
                return
            frames = None
            if msg.type in TERMINAL_EVENT_STATES:
                self._prune_wanted = True  # a job finished: the store may now hold more than it should keep
            now = time.monotonic()
            for peer, sub in self._subs.of_job(job.job_id):
                key = (peer, job.job_id)
                if sub.cursor != msg.seq or sub.blocked_until > now:
                    if sub.cursor <= int(msg.seq or 0):
                        self._subs.waiting.add(key)  # behind: the pump feeds it from disk
                    continue
                frames = frames or encode(msg, self.limits, validate=False)
                if self._send_frames(sock, peer, frames):
                    self._advance(key, sub, msg)
                elif key in self._subs:
                    self._block(key, sub)

    def _block(self, key: Key, sub: Sub) -> None:
        """A subscriber that could not take an event now: retried from disk shortly."""
        sub.blocked_until = time.monotonic() + (0.05 if self._queued_bytes >= self.max_queued_bytes else 0.01)
        self._subs.waiting.add(key)

    def _send_frames(self, sock: zmq.Socket, peer: bytes, frames: list[Any]) -> bool:
        """Send encoded frames without blocking; False if the peer's queue is full, it is gone, or bytes are bounded."""
        return self._try_send(sock, peer, frames) == "sent"

    def _try_send(self, sock: zmq.Socket, peer: bytes, frames: list[Any]) -> str:
        """"sent", "full" (the peer's queue), "gone" (the peer), or "bounded" (max_queued_bytes across peers)."""
        nbytes = _frames_bytes(frames)
        track = nbytes >= _TRACK_BYTES
        if track and not self._has_room(nbytes):
            return "bounded"
        try:
            tracker = sock.send_multipart([peer, *frames], copy=False, flags=zmq.NOBLOCK, track=track)
        except zmq.Again:
            return "full"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._drop_peer(peer)
                return "gone"
            raise
        if track:
            self._queued_bytes += nbytes
            self._in_flight.append((tracker, nbytes))
        return "sent"

    def _pump(self, sock: zmq.Socket) -> None:
        """Feed subscribers that are behind from the job's log, a few events each per turn."""
        now = time.monotonic()
        for key in list(self._subs.waiting):
            sub = self._subs.get(key)
            if sub is None:
                self._subs.waiting.discard(key)
                continue
            if sub.blocked_until > now:
                continue
            try:
                job = self.store.get(key[1])
                for _ in range(_PUMP_BATCH):
                    if sub.cursor >= job.next_seq or key not in self._subs:
                        break
                    event = job.read_event(sub.cursor)
                    if not self._send_frames(sock, key[0], encode(event, self.limits, validate=False)):
                        if key in self._subs:
                            self._block(key, sub)
                        break
                    self._advance(key, sub, event)
                else:
                    continue  # a full batch: more next turn
                if key in self._subs and sub.cursor >= job.next_seq and sub.blocked_until <= time.monotonic():
                    self._subs.waiting.discard(key)  # caught up: live events reach it directly
            except (StoreError, ProtocolError) as exc:
                # A job file changed on disk behind the store's back: tell this subscriber, keep serving the rest.
                log.error("replay of job %s to a subscriber stopped: %s", key[1], exc)
                self._subs.remove(key)
                text = f"{exc}; later events can be requested with subscribe from_seq={sub.cursor + 1}"
                self._send(sock, key[0], Message("error", {"message": text[:4096], "code": "corrupt_job"}, job=key[1]))

    def _prune(self) -> None:
        """Apply the retention settings (oldest finished jobs first); jobs being replayed are kept for now."""
        self._pruned_at = time.monotonic()
        if self.keep_jobs is None and self.keep_days is None:
            return
        try:
            deleted = self.store.prune(self.keep_jobs, self.keep_days, protect=self._subs.jobs())
        except OSError as exc:
            log.error("retention: could not delete old jobs: %s", exc)
            return
        for job_id in deleted:
            log.info("retention: deleted finished job %s (keep %s jobs, %s days)", job_id, self.keep_jobs, self.keep_days)

    def _advance(self, key: Key, sub: Sub, sent: Message) -> None:
        """Move a subscriber past an event it was sent; after a terminal event it is done."""
        sub.cursor += 1
        sub.blocked_until = 0.0
        if sent.type in TERMINAL_EVENT_STATES:
            self._subs.remove(key)  # nothing follows; also frees subscriptions of vanished clients


def _frames_bytes(frames: list[Any]) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)
