"""The ``--ray`` flags without a cluster: plain ``dreamflow serve`` never imports Ray; bad flags are
refused with one line naming them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ray_helpers import REPO

ENV_CODE = f"import sys; sys.path[:0] = [{str(REPO / 'backend')!r}, {str(REPO / 'shared')!r}]\n"


def test_plain_serve_never_imports_ray(tmp_path):
    # The real serve command in this process's main thread; a watcher checks sys.modules once it
    # listens (after the worker started and the capabilities imported torch and the pipeline).
    code = ENV_CODE + """
import os, sys, threading, time
from dreamflow.server import server as srv
opened = threading.Event()
original = srv.Server.open
def open_and_tell(self):
    endpoint = original(self)
    opened.set()
    return endpoint
srv.Server.open = open_and_tell
def watch():
    opened.wait(120)
    time.sleep(0.5)
    loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    print("RAY MODULES:", loaded, flush=True)
    os._exit(0 if opened.is_set() and not loaded else 3)
threading.Thread(target=watch, daemon=True).start()
from dreamflow.cli import main
main(["serve", "--bind", "tcp://127.0.0.1:*", "--store", sys.argv[1], "--log-level", "warning"])
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RAY MODULES: []" in out.stdout


def test_ray_flags_without_ray_are_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", ENV_CODE + "from dreamflow.cli import main; sys.exit(main(sys.argv[1:]))",
                          "serve", "--bind", "tcp://127.0.0.1:*", "--store", str(tmp_path / "store"), "--job-gpus", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.strip() == "error: --job-gpus need --ray ADDRESS (jobs run in this process otherwise)"


@pytest.mark.parametrize("args, words", [
    (["--ray", "local", "--job-cpus", "0"], "--job-cpus must be in (0, 1024]"),
    (["--ray", "local", "--job-gpus", "-1"], "--job-gpus must be in [0, 64]"),
    (["--ray", "local", "--job-memory", "0"], "--job-memory must be in (0, 4096]"),
    (["--ray", "local", "--job-retries", "-2"], "--job-retries must be in [0, 100]"),
    (["--ray", "local", "--worker-idle", "-1"], "--worker-idle must be in [0, 3600] seconds"),
])
def test_bad_ray_flags_are_refused_by_name(args, words):
    from dreamflow.cli import build_parser
    from dreamflow.cli.server import _job_runner

    with pytest.raises(ValueError, match=re.escape(words)):
        _job_runner(build_parser().parse_args(["serve", *args]))


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_cluster_is_refused_at_once_by_name(tmp_path, address):
    from ray_helpers import free_port

    from dreamflow.server.ray_runner import RayJobs, RayOptions
    from dreamflow.server.store import JobStore

    address = address.format(port=free_port())
    runner = RayJobs(JobStore(tmp_path / "store"), lambda job, msg: None, RayOptions(address=address))
    with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at {re.escape(repr(address))}"):
        runner.start()


def test_the_kuberay_sample_runs_a_command_this_server_accepts():
    import yaml

    from dreamflow.cli import build_parser
    from dreamflow.cli.server import _job_runner

    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "dreamflow-raycluster.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayCluster", "Service", "NetworkPolicy", "PersistentVolumeClaim"}
    head = kinds["RayCluster"]["spec"]["headGroupSpec"]
    server = next(c for c in head["template"]["spec"]["containers"] if c["name"] == "dreamflow-server")
    args = build_parser().parse_args(server["command"][1:])
    assert args.ray and args.keys and _job_runner(args) is not None
    # Clients reach the DreamFlow port and nothing else.
    assert [p["port"] for p in kinds["Service"]["spec"]["ports"]] == [5555]
    assert head["rayStartParams"]["include-dashboard"] == "false"
