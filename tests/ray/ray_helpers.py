"""A real Ray cluster on this machine for the scale-out tests and benchmark: a head node and more
node processes, each declaring one fake GPU, all small (1 CPU, 100 MB object store, no dashboard).
Clients reach the head at 127.0.0.1; Ray itself replaces a loopback node address by the machine's
own address and listens on all interfaces (README "Scaling out" says how to keep that private).

Each node is one ``ray start --block`` in its own process group, with a private temp folder and
ports, so a node can be killed like a machine that dies (SIGKILL to its whole group) and the
cluster torn down without touching any other Ray on the machine (no ``ray stop``, which would
stop every Ray of this user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``ray start`` process group."""

    def __init__(self, proc: subprocess.Popen, name: str, log: Path) -> None:
        self.proc, self.name, self.log = proc, name, log

    def kill(self) -> None:
        """SIGKILL every process of this node (raylet, its workers, agents): a machine that dies."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def runs(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this node (Ray's workers are children of its raylet)."""
        while pid > 1:
            try:
                if os.getpgid(pid) == self.proc.pid:
                    return True
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (ProcessLookupError, FileNotFoundError):
                return False
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
        return False

    def stop(self) -> None:
        """SIGTERM the node's group, then SIGKILL what is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.2)
        self.kill()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class LocalCluster:
    """A head node plus worker nodes on 127.0.0.1, each with ``--num-gpus 1`` (fake GPUs on a CPU)."""

    def __init__(self, gpus_per_node: int = 1, cpus_per_node: int = 1) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dfray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.gpus, self.cpus = gpus_per_node, cpus_per_node
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        base = 10100 + (os.getpid() * 37) % 18000  # below the kernel's ephemeral ports, where free_port() picks
        self._worker_ports = iter(range(base, base + 4000, 200))
        self.env = dict(os.environ, PYTHONPATH=f"{REPO / 'backend'}{os.pathsep}{REPO / 'shared'}", OMP_NUM_THREADS="1",
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                        # A killed node is noticed in about 3 s instead of the default 15-30 s.
                        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
                        RAY_health_check_failure_threshold="4", RAY_gcs_rpc_server_reconnect_timeout_s="10")

    def _start(self, head: bool) -> Node:
        # Ray gives a node 30 s to register with the head; on a loaded 2-core machine that is
        # sometimes too short, and the next try usually succeeds.
        for attempt in range(3):
            try:
                return self._try_start(head)
            except AssertionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _try_start(self, head: bool) -> Node:
        name = "head" if head else f"node{len(self.nodes)}"
        lo = next(self._worker_ports)
        args = [RAY, "start", "--block", "--num-cpus", str(self.cpus), "--num-gpus", str(self.gpus),
                "--object-store-memory", str(100 * 1024 * 1024),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 199),
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--disable-usage-stats"]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", str(self.tmp),
                     "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(["nice", "-n", "10", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True, cwd=str(self.tmp))
        node = Node(proc, name, log)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                node.stop()
                raise AssertionError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        self.nodes.append(node)
        return node

    def start(self, nodes: int = 2) -> "LocalCluster":
        """The head and ``nodes - 1`` more nodes."""
        self._start(head=True)
        for _ in range(nodes - 1):
            self._start(head=False)
        return self

    def add_node(self) -> Node:
        """One more worker node."""
        return self._start(head=False)

    def teardown(self) -> None:
        """Stop every node of this cluster (worker nodes first, then the head)."""
        threads = [threading.Thread(target=n.stop) for n in self.nodes[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.nodes:
            self.nodes[0].stop()
        self.nodes.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
