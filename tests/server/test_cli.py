"""The headless commands: serve, keys, submit --wait, status, cancel, fetch, and their errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_support import collect
from server_runners import StepRunner

from dreamflow.cli import main
from dreamflow_protocol import Client, ConnectionTimeout
from dreamflow_protocol.keys import create_keys, load_client_keys

NOWHERE = "tcp://127.0.0.1:9"  # the discard port: nothing speaks ZeroMQ there


@pytest.mark.parametrize("argv", [["status"], ["status", "ab" * 16], ["cancel", "ab" * 16],
                                  ["fetch", "ab" * 16, "--out", "x"], ["submit", "a chair"]])
def test_client_commands_fail_with_one_line_when_no_server_answers(argv, capsys):
    assert main([*argv, "--connect", NOWHERE, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == (f"error: no DreamFlow server answered at {NOWHERE} within 0.3 s; start one with `dreamflow serve`; "
                   f"if the server was started with --keys, pass --keys DIR too")


def test_submit_wait_status_and_fetch(make_server, tmp_path, capsys):
    srv = make_server(runner=StepRunner(steps=4))
    out = tmp_path / "result"
    assert main(["submit", "a teapot", "--preset", "smoke", "--seed", "3", "--set", "stage1.steps=2", "--wait",
                 "--out", str(out), "--connect", srv.endpoint]) == 0
    captured = capsys.readouterr()
    job = captured.out.splitlines()[0]
    assert "[stage1] step 4/4" in captured.err and f"job {job} done" in captured.err
    assert (out / "model.glb").read_bytes() == (srv.server.store.get(job).out_dir / "model.glb").read_bytes()
    assert main(["status", job, "--connect", srv.endpoint]) == 0
    assert '"state": "done"' in capsys.readouterr().out
    assert main(["status", "--connect", srv.endpoint]) == 0
    listing = capsys.readouterr().out
    assert job in listing and "a teapot" in listing
    again = tmp_path / "again"
    assert main(["fetch", job, "--out", str(again), "--connect", srv.endpoint]) == 0
    assert (again / "report.json").exists()


def test_cancel_command_and_errors_for_unknown_jobs(make_server, make_client, capsys):
    runner = StepRunner(steps=300, step_seconds=0.05)
    srv = make_server(runner=runner)
    watcher = make_client(srv.endpoint)
    job = watcher.submit("long", preset="smoke")
    assert runner.started.wait(20)
    assert main(["cancel", job, "--connect", srv.endpoint]) == 0
    assert collect(watcher, job)[-1].type == "cancelled"
    assert main(["status", "cd" * 16, "--connect", srv.endpoint]) == 1
    assert capsys.readouterr().err.strip() == f"error: unknown job {'cd' * 16}"
    assert main(["submit", "x", "--set", "stage1.steps", "--connect", srv.endpoint]) == 1
    assert "must look like key=value" in capsys.readouterr().err


def test_curve_keys_let_in_only_clients_with_the_right_key(make_server, tmp_path):
    keys = create_keys(tmp_path / "keys")
    assert sorted(p.name for p in keys.iterdir()) == ["authorized", "client.key", "client.key_secret", "server.key",
                                                       "server.key_secret"]
    srv = make_server(keys=keys)
    with Client(srv.endpoint, keys=load_client_keys(keys), timeout=5) as good:
        assert good.capabilities["auth"] == "curve"
        assert good.ping() < 1.0
    stranger = create_keys(tmp_path / "other")  # a valid key pair the server never authorised
    for bad in (Client(srv.endpoint, timeout=1), Client(srv.endpoint, keys=load_client_keys(stranger), timeout=1)):
        with pytest.raises(ConnectionTimeout):
            bad.connect()
        bad.close()


def test_serve_command_runs_and_refuses_public_binds_without_keys(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    refused = subprocess.run([sys.executable, "-m", "dreamflow", "serve", "--bind", "tcp://0.0.0.0:0", "--store",
                              str(tmp_path / "s")], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "needs authentication" in refused.stderr
    proc = subprocess.Popen([sys.executable, "-m", "dreamflow", "serve", "--bind", "tcp://127.0.0.1:*", "--store",
                             str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on tcp://127.0.0.1:" in line, line + proc.stderr.read()
        endpoint = line.split("listening on ")[1].split()[0]
        with Client(endpoint, timeout=10) as client:
            assert client.capabilities["presets"] and client.ping() < 1.0
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_submit_sends_an_input_mesh_file_for_refinement(make_server, tmp_path, capsys):
    import numpy as np
    import trimesh

    runner = StepRunner(steps=1)
    srv = make_server(runner=runner)
    box = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
    box.export(tmp_path / "box.obj")
    assert main(["submit", "refine the box", "--preset", "smoke", "--mesh", str(tmp_path / "box.obj"), "--start-stage",
                 "texture", "--start-t", "0.35", "--wait", "--connect", srv.endpoint]) == 0
    call = runner.calls[0]
    assert call["start_stage"] == "texture" and abs(call["start_t"] - 0.35) < 1e-9
    mesh = call["input_mesh"]
    assert len(mesh.faces) == 12 and np.allclose(np.ptp(mesh.vertices, axis=0), (1.0, 2.0, 0.5))
    assert main(["submit", "x", "--mesh", str(tmp_path / "missing.obj"), "--connect", srv.endpoint]) == 1
    assert "cannot read mesh" in capsys.readouterr().err
