"""Authentication: off loopback only with CURVE; only authorised keys get in; no secret is ever logged.

Traffic stays on loopback: CURVE is exercised on 127.0.0.1, and "non-loopback needs keys" is
checked by the refusal that comes before any socket exists.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth
from reliability_helpers import RawPeer, RunningServer, collect, serve, stop
from server_runners import StepRunner

from dreamflow.cli import main
from dreamflow.server import Server, ServerConfigError
from dreamflow_protocol import is_local_endpoint
from dreamflow_protocol import Client, ConnectionTimeout, CurveKeys, Message, encode
from dreamflow_protocol.keys import create_keys, load_client_keys

PUBLIC = ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://[::]:5555", "tcp://eth0:5555",
          "tcp://127.0.0.1.example.com:5555", "tcp://example.com:5555", "udp://127.0.0.1:5555", "ws://0.0.0.0:5555"]
LOCAL = ["tcp://127.0.0.1:5555", "tcp://127.8.9.10:5555", "tcp://[::1]:5555", "tcp://localhost:5555", "ipc:///tmp/df.sock"]


@pytest.mark.parametrize("endpoint", PUBLIC)
def test_binding_beyond_loopback_without_keys_is_refused_before_anything_is_opened(endpoint, tmp_path):
    assert not is_local_endpoint(endpoint)
    with pytest.raises(ServerConfigError, match=r"refusing to bind .* needs authentication; make keys with `dreamflow keys"):
        Server(tmp_path / "store", endpoint)
    assert not (tmp_path / "store").exists(), "the refusal must come before the server touches anything"


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_endpoints_need_no_keys(endpoint):
    assert is_local_endpoint(endpoint)


def test_serve_command_refuses_a_public_bind_without_keys_and_accepts_it_with_keys(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dreamflow", "serve", "--bind", "tcp://0.0.0.0:0",
                           "--store", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: refusing to bind tcp://0.0.0.0:0")
    assert "listening" not in done.stdout and not (tmp_path / "s").exists()
    # With keys the same bind is accepted and serves. The socket listens on every interface for the
    # moment of the test, behind CURVE; the client reaches it over loopback.
    keys = create_keys(tmp_path / "keys")
    proc, endpoint = serve(tmp_path / "s2", "--keys", str(tmp_path / "keys"), bind="tcp://0.0.0.0:*")
    try:
        port = endpoint.rsplit(":", 1)[1]
        assert endpoint.startswith("tcp://0.0.0.0:") and port.isdigit()
        with Client(f"tcp://127.0.0.1:{port}", keys=load_client_keys(keys), timeout=20) as client:
            assert client.capabilities["auth"] == "curve"
            assert client.status(), "an authorised client gets the server's summary"
        unkeyed = Client(f"tcp://127.0.0.1:{port}", keys=None, timeout=1.0)
        with pytest.raises(ConnectionTimeout):
            unkeyed.connect()
        unkeyed.close()
    finally:
        stop(proc)


def _secrets(folder) -> list[bytes]:
    out = []
    for name in ("server", "client"):
        public, secret = zmq.auth.load_certificate(str(folder / f"{name}.key_secret"))
        out += [secret, zmq.utils.z85.decode(secret).hex().encode()]
    return out


def test_curve_serves_the_authorised_key_and_refuses_no_key_wrong_key_and_wrong_server(tmp_path, caplog):
    caplog.set_level("DEBUG")
    keys = create_keys(tmp_path / "keys")
    stranger = create_keys(tmp_path / "stranger")  # a valid pair the server never authorised
    srv = RunningServer(Server(tmp_path / "store", "tcp://127.0.0.1:*", keys=keys, runner=StepRunner(steps=3)))
    try:
        good = load_client_keys(keys)
        with Client(srv.endpoint, keys=good, timeout=10) as client:
            assert client.capabilities["auth"] == "curve"
            job = client.submit("authorised", preset="smoke")
            assert collect(client, job)[-1].type == "job_done"
        impostor = CurveKeys(load_client_keys(stranger).server_public, good.client_public, good.client_secret)
        for keys_used in (None, load_client_keys(stranger), impostor):
            bad = Client(srv.endpoint, keys=keys_used, timeout=1.0)
            with pytest.raises(ConnectionTimeout):
                bad.connect()
            bad.close()
        plain = RawPeer(srv.endpoint)  # no CURVE at all: the handshake fails, nothing is answered
        ping = Message("ping")
        with pytest.raises(TimeoutError):
            plain.ask(encode(ping), ping.id, timeout=1.0)
        plain.close()
        assert srv.server.store.all()[0].spec["prompt"] == "authorised" and len(srv.server.store.all()) == 1
    finally:
        srv.stop()
    text = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert text, "expected the server to log something at debug level"
    for secret in _secrets(keys):
        assert secret not in text


def test_no_secret_key_material_reaches_the_server_output(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keys", "--out", str(keys)]) == 0
    printed = capsys.readouterr()
    proc, endpoint = serve(tmp_path / "store", "--keys", str(keys), "--log-level", "debug")
    try:
        with Client(endpoint, keys=load_client_keys(keys), timeout=20) as client:
            assert client.ping() < 5.0
        bad = Client(endpoint, timeout=1.0)
        with pytest.raises(ConnectionTimeout):
            bad.connect()
        bad.close()
        time.sleep(0.2)
    finally:
        err = stop(proc)
    assert "listening on" in err and "ALLOWED (CURVE)" in err, err[-2000:]  # it did log, at debug level, keys included
    everything = (printed.out + printed.err + err).encode()
    for secret in _secrets(keys):
        assert secret not in everything
    client_keys = load_client_keys(keys)
    assert client_keys.client_secret.decode() not in repr(client_keys)
