"""Malformed messages, a backend that vanishes (and comes back), one that never answers, and the
online-access rule: each ends as a clear message, never as an exception out of the drain."""

from __future__ import annotations

import threading

import bpy
import numpy as np
import pytest
import zmq
from addon_helpers import ServerProcess, free_port, point_at, pump
from dreamflow_protocol import Message, decode, encode


class MisbehavingServer:
    """A ROUTER that answers the handshake properly, then streams a job of bad messages."""

    JOB = "b" * 32

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, peer: bytes, msg: Message, validate: bool = True) -> None:
        self.sock.send_multipart([peer, *encode(msg, validate=validate)])

    def _bad_job(self, peer: bytes) -> None:
        verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
        degenerate = np.array([[0, 1, 2], [1, 1, 3]], np.int32)   # passes the protocol, not Blender
        self._send(peer, Message("mesh", {"stage": "stage1", "step": 1, "final": False},
                                 {"vertices": verts, "faces": degenerate}, job=self.JOB, seq=0))
        self.sock.send_multipart([peer, b"\x93not a header", b"junk"])  # undecodable
        self._send(peer, Message("progress", {"stage": "stage1", "step": "two", "total": 5}, job=self.JOB, seq=1),
                   validate=False)                                       # a field of the wrong type
        self._send(peer, Message("progress", {"stage": "stage1", "step": 2, "total": 5}, job=self.JOB, seq=1))
        self._send(peer, Message("error", {"message": "CUDA out of memory", "code": "job_failed"}, job=self.JOB, seq=2))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            peer, *frames = self.sock.recv_multipart()
            msg = decode(frames)
            if msg.type == "ping":
                self._send(peer, msg.reply("pong", {"server_time": 0.0, "server_id": "misbehaving"}))
            elif msg.type == "hello":
                self._send(peer, msg.reply("capabilities", {
                    "protocol": 1, "server_version": "test", "server_id": "misbehaving", "device": "none",
                    "accelerators": {}, "presets": ["smoke"], "methods": ["apfo"], "start_stages": [], "limits": {},
                    "max_queue": 1, "auth": "none"}))
            elif msg.type == "submit":
                self._send(peer, msg.reply("accepted", {"position": 0, "state": "queued"}, job=self.JOB))
                self._bad_job(peer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_malformed_messages_and_backend_errors_become_messages(addon):
    bad = MisbehavingServer()
    try:
        point_at(bad.endpoint)
        s = bpy.context.scene.dreamflow
        s.prompt = "anything"
        assert bpy.ops.dreamflow.generate() == {"FINISHED"}
        job = s.jobs[0]
        pump(addon, lambda: job.state == "failed")
        state = bpy.context.window_manager.dreamflow
        assert "CUDA out of memory" in job.message and "CUDA out of memory" in state.last_error
        assert job.step == 2                           # the good progress between the bad ones arrived
        # The degenerate mesh built nothing: no object, no stray mesh datablock.
        assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0
        # The two undecodable messages were reported (the panel shows the last error; the console all).
        assert len(addon.live.get_session().client.dropped) == 2
    finally:
        addon.live.close_session()
        bad.close()


def test_malformed_message_is_reported_in_the_panel(addon, capsys):
    bad = MisbehavingServer()
    try:
        point_at(bad.endpoint)
        s = bpy.context.scene.dreamflow
        s.prompt = "anything"
        bpy.ops.dreamflow.generate()
        pump(addon, lambda: len(s.jobs) and s.jobs[0].state == "failed")
        out = capsys.readouterr().out
        assert "malformed message" in out and "could not apply its mesh message" in out
        assert "repeat a vertex" in out
    finally:
        addon.live.close_session()
        bad.close()


def test_vanished_backend_is_reported_and_the_job_resumes_when_it_returns(addon, tmp_path):
    first = ServerProcess(tmp_path / "store").start()
    second = ServerProcess(tmp_path / "store", port=first.port)
    try:
        point_at(first.endpoint)
        s = bpy.context.scene.dreamflow
        s.prompt = "outlive the server"
        s.preset = "smoke"
        s.extra_overrides = "stage1.steps=30"
        bpy.ops.dreamflow.generate()
        job = s.jobs[0]
        pump(addon, lambda: job.step >= 3)
        first.kill()
        state = bpy.context.window_manager.dreamflow
        pump(addon, lambda: state.connection == "LOST", timeout=10)
        assert "Lost the connection" in state.connection_message
        for _ in range(20):
            assert addon.live.drain_and_apply(bpy.context.scene) == 0   # nothing arrives, nothing raises
        seen = job.last_seq
        # The backend comes back on the same address with the same job store: the job resumes and
        # the client resubscribes from the last sequence number this file saw.
        second.start()
        pump(addon, lambda: job.state == "done", timeout=40)
        assert job.last_seq > seen
        assert state.connection == "CONNECTED"
        assert [o for o in bpy.data.objects if o.get("dreamflow_job") == job.job_id][0].data["dreamflow_step"] == 30
    finally:
        addon.live.close_session()
        first.kill()
        second.kill()


def test_unreachable_backend_fails_the_job_with_a_clear_message(addon):
    point_at(f"tcp://127.0.0.1:{free_port()}")
    bpy.context.preferences.addons[addon.__name__].preferences.timeout = 0.5
    s = bpy.context.scene.dreamflow
    s.prompt = "nobody listens"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}   # returns at once; the outcome comes later
    job = s.jobs[0]
    pump(addon, lambda: job.state == "failed", timeout=10)
    state = bpy.context.window_manager.dreamflow
    assert "no DreamFlow server answered" in job.message
    assert state.connection == "UNREACHABLE" and "dreamflow serve" in state.connection_message


def test_remote_backend_needs_online_access(addon):
    assert bpy.app.online_access is False                 # the bpy module's default
    point_at("tcp://10.20.30.40:5555")
    bpy.context.scene.dreamflow.prompt = "remote"
    # An operator's ERROR report reaches a Python caller as RuntimeError (in the UI: the status bar).
    with pytest.raises(RuntimeError, match="online access is off"):
        bpy.ops.dreamflow.generate()
    state = bpy.context.window_manager.dreamflow
    assert "online access" in state.connection_message
    assert len(bpy.context.scene.dreamflow.jobs) == 0


def test_local_backend_starts_with_connect_speaks_curve_and_stops_when_the_addon_is_disabled(addon, tmp_path):
    from pathlib import Path

    import addon_utils
    from addon_helpers import ADDON_MODULE, PYTHON
    from dreamflow_protocol.keys import create_keys

    keys = create_keys(tmp_path / "keys")
    prefs = bpy.context.preferences.addons[ADDON_MODULE].preferences
    prefs.address = f"tcp://127.0.0.1:{free_port()}"
    prefs.start_local = True
    prefs.backend_executable = "/nonexistent/dreamflow"
    with pytest.raises(RuntimeError, match="not found"):
        bpy.ops.dreamflow.connect()
    prefs.server_key_file = str(keys / "server.key")
    with pytest.raises(RuntimeError, match="both the server public key and the client secret key"):
        bpy.ops.dreamflow.connect()
    prefs.client_key_file = str(keys / "client.key_secret")
    prefs.backend_executable = str(Path(PYTHON).with_name("dreamflow"))
    prefs.backend_arguments = f"serve --bind {{address}} --store {tmp_path / 'store'} --keys {keys}"
    assert bpy.ops.dreamflow.connect() == {"FINISHED"}
    process = addon.live.local_backend.process
    state = bpy.context.window_manager.dreamflow
    pump(addon, lambda: state.connection == "CONNECTED" and state.server_info, timeout=90)
    assert process.poll() is None and "cpu" in state.server_info
    assert addon.live.get_session().client.capabilities["auth"] == "curve"
    addon_utils.disable(ADDON_MODULE, default_set=True)      # unregister stops what it started
    assert process.poll() is not None


def test_every_new_malformed_message_is_reported_once_even_past_the_clients_bounded_record(addon):
    session = addon.session.Session(f"tcp://127.0.0.1:{free_port()}")
    try:
        client = session.client
        reports = []
        for i in range(250):
            # What the client does on each undecodable message: keep the last 100.
            client.dropped = [*client.dropped[-99:], f"bad {i % 7}"]
            if i % 3 == 0:
                reports += session.new_malformed()
        reports += session.new_malformed()
        assert reports == [f"bad {i % 7}" for i in range(250)]
        assert session.new_malformed() == []
    finally:
        session.close()


def test_a_connection_error_leaves_the_panel_once_the_backend_answers(addon, tmp_path):
    port = free_port()
    point_at(f"tcp://127.0.0.1:{port}")
    bpy.context.preferences.addons[addon.__name__].preferences.timeout = 0.5
    s = bpy.context.scene.dreamflow
    s.prompt = "before the server is up"
    bpy.ops.dreamflow.generate()
    state = bpy.context.window_manager.dreamflow
    pump(addon, lambda: s.jobs[0].state == "failed", timeout=10)
    assert "no DreamFlow server answered" in state.last_error
    for _ in range(5):
        addon.live.drain_and_apply(bpy.context.scene)
    assert state.last_error                               # it still holds while nobody answers
    server = ServerProcess(tmp_path / "store", port=port).start()
    try:
        pump(addon, lambda: state.connection == "CONNECTED", timeout=20)
        assert state.last_error == ""                      # healthy again: the error has passed
        assert "no DreamFlow server answered" in s.jobs[0].message   # the job's row keeps what happened
    finally:
        server.kill()


def test_other_errors_age_out_and_a_new_job_clears_them(addon):
    live = addon.live
    state = bpy.context.window_manager.dreamflow
    live.report("ERROR", "The backend sent a malformed message, ignored: junk")
    at = state.last_error_at
    live.clear_passed_error(now=at + live.ERROR_SHOW_SECONDS - 1)
    assert state.last_error.endswith("junk")
    live.clear_passed_error(now=at + live.ERROR_SHOW_SECONDS + 1)
    assert state.last_error == ""
    # A connection error does not age out while the connection is still down.
    live.report("ERROR", "Cannot reach the DreamFlow backend: nobody", about="connection")
    state.connection = "UNREACHABLE"
    live.clear_passed_error(now=state.last_error_at + 10 * live.ERROR_SHOW_SECONDS)
    assert "nobody" in state.last_error
    # Starting a job: the earlier error is no longer news (nobody listens there: no job runs anywhere).
    point_at(f"tcp://127.0.0.1:{free_port()}")
    bpy.context.scene.dreamflow.prompt = "next try"
    assert bpy.ops.dreamflow.generate() == {"FINISHED"}
    assert state.last_error == ""
