"""One rule for "this endpoint stays on this machine", shared by the server and the Blender add-on,
checked on hostile spellings (issue 17, point 3)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dreamflow_protocol import is_local_endpoint
from dreamflow_protocol import endpoints

LOCAL = [
    "tcp://127.0.0.1:5555", "tcp://127.0.0.2:1", "tcp://127.255.255.254:65535", "tcp://localhost:1",
    "tcp://LOCALHOST:1", "tcp://LocalHost:5555", "tcp://[::1]:5555", "tcp://[0:0:0:0:0:0:0:1]:5555",
    "tcp://[0000:0000:0000:0000:0000:0000:0000:0001]:5555", "tcp://[::ffff:127.0.0.1]:5555",
    "tcp://[::FFFF:7f00:1]:5555", "tcp://127.0.0.1:*", "tcp://127.0.0.1:0", " tcp://127.0.0.1:5555 ",
    "ipc:///tmp/dreamflow.sock", "ipc://@abstract", "inproc://jobs",
]
REMOTE = [
    "tcp://127.evil.com:1", "tcp://127.0.0.1.evil.com:1", "tcp://localhost.evil.com:1", "tcp://evil.com:1",
    "tcp://localhost.:1", "tcp://127.0.0.1.:1",                          # trailing dot: a DNS name
    "tcp://127.1:1", "tcp://2130706433:1", "tcp://0x7f.0.0.1:1", "tcp://0177.0.0.1:1",
    "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://[::]:5555", "tcp://[::ffff:10.0.0.1]:5555",
    "tcp://[::ffff:0.0.0.0]:1", "tcp://10.1.2.3:5555", "tcp://192.168.1.20:5555", "tcp://[fe80::1%eth0]:1",
    "tcp://eth0:5555", "tcp://lo:5555",                                 # interface names are not addresses
    "tcp://evil.com@127.0.0.1:1", "tcp://127.0.0.1:1@evil.com:1",       # userinfo tricks of URL parsers
    "tcp://127.0.0.1:1;10.0.0.1:5555", "tcp://10.0.0.1:0;127.0.0.1:5555",  # ZeroMQ's source;destination
    "tcp://127.0.0.1/evil.com:1", "tcp://127.0.0.1#@evil.com:1",
    "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://127.0.0.1:port", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:-1",
    "tcp://[::1]", "tcp://::1", "tcp://[::1:5555", "tcp://::1]:5555", "tcp://:5555", "tcp://",
    "TCP://127.0.0.1:5555", "IPC:///tmp/x", "udp://127.0.0.1:5555", "ws://127.0.0.1:5555", "http://localhost:1",
    "ipc://", "inproc://", "127.0.0.1:5555", "localhost", "", "   ", "tcp:/127.0.0.1:1", "tcp://127.0.0.1:٥٥٥٥",
    None, 5555, b"tcp://127.0.0.1:5555",
]


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_and_machine_local_endpoints_are_local(endpoint):
    assert is_local_endpoint(endpoint) is True


@pytest.mark.parametrize("endpoint", REMOTE)
def test_anything_not_provably_local_is_remote(endpoint):
    assert is_local_endpoint(endpoint) is False


def test_the_server_and_the_addon_use_this_one_function():
    from dreamflow.server import server

    assert server.is_local_endpoint is endpoints.is_local_endpoint
    path = Path(__file__).resolve().parents[2] / "blender_addon" / "jobspec.py"
    spec = importlib.util.spec_from_file_location("dreamflow_addon_jobspec_endpoints", path)
    jobspec = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = jobspec
    spec.loader.exec_module(jobspec)
    assert jobspec.is_local_endpoint is endpoints.is_local_endpoint
    assert "def is_local_endpoint" not in path.read_text()
