"""Server-side and headless-client commands: serve, keys, submit, status, cancel, fetch.

Every client command fails with one clear line and exit code 1 when no server answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_ENDPOINT = os.environ.get("DREAMFLOW_SERVER", "tcp://127.0.0.1:5555")
DEFAULT_STORE = os.environ.get("DREAMFLOW_STORE", "dreamflow-store")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``dreamflow`` parser."""
    p = sub.add_parser("serve", help="run the job server (ZeroMQ) for the Blender add-on and headless clients")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="endpoint to listen on (default: loopback only)")
    p.add_argument("--store", default=DEFAULT_STORE, help="job store folder (specs, events, checkpoints, results)")
    p.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; beyond it submit answers busy")
    p.add_argument("--keys", default=None, help="CURVE key folder from `dreamflow keys` (required off loopback)")
    p.add_argument("--max-frame-mb", type=int, default=512, help="largest array frame accepted, in MiB")
    p.add_argument("--keep-jobs", type=int, default=100, help="finished jobs kept in the store; older ones are deleted (0: all)")
    p.add_argument("--keep-days", type=float, default=30.0, help="days a finished job is kept (0: no age limit)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose models and files jobs may name by path (repeatable); otherwise jobs may name "
                        "only model ids and the models shipped with DreamFlow")
    p.add_argument("--max-steps", type=int, default=None, help="refuse jobs with more optimisation steps per stage than this")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="refuse jobs with a larger render, mesh, grid or texture resolution than this")
    p.add_argument("--max-queued-mb", type=int, default=512,
                   help="bound on bytes waiting to be sent to slow clients, all clients together, in MiB")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g = p.add_argument_group("scaling out on a Ray cluster (pip install dreamflow[ray]; README \"Scaling out\")")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run each job as a Ray actor: auto (the cluster this machine belongs to), local (a private "
                        "instance here), ray://HOST:PORT (Ray Client) or HOST:PORT (the head's GCS address)")
    g.add_argument("--job-gpus", type=float, default=None, help="GPUs per job (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--job-cpus", type=float, default=1.0, help="CPUs per job (default 1)")
    g.add_argument("--job-memory", type=float, default=None, metavar="GIB", help="memory Ray reserves per job, in GiB")
    g.add_argument("--job-retries", type=int, default=2, help="restarts from the last checkpoint after a lost node (default 2)")
    g.add_argument("--worker-idle", type=float, default=30.0, metavar="SECONDS",
                   help="how long a worker whose job is done stays warm, holding its GPU, for the next queued job "
                        "(default 30; 0: a new worker for every job)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="make CURVE key pairs for authenticated remote use")
    p.add_argument("--out", required=True, help="folder to write server and client keys into")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("submit", help="submit a generation job to a server")
    p.add_argument("prompt")
    p.add_argument("--negative", "--negative-prompt", dest="negative_prompt", default=None)
    p.add_argument("--preset", default=None, help="paper, preview or smoke (server default: preview)")
    p.add_argument("--method", default=None, choices=("apfo", "vsd", "sds", "fsd"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by dotted path, e.g. --set stage1.steps=200 (repeatable)")
    p.add_argument("--mesh", default=None, help="input mesh file (OBJ/GLB/PLY) to refine")
    p.add_argument("--start-stage", default=None, choices=("geometry", "texture", "refine"))
    p.add_argument("--start-t", type=float, default=None, help="timestep to start refining the input mesh from")
    p.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    p.add_argument("--out", default=None, help="with --wait: fetch the results into this folder")
    _client_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a job's status, or the server's and its jobs'")
    p.add_argument("job", nargs="?")
    _client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="stop a queued or running job")
    p.add_argument("job")
    _client_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("fetch", help="download a finished job's result files")
    p.add_argument("job")
    p.add_argument("--out", required=True)
    _client_args(p)
    p.set_defaults(func=cmd_fetch)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default=DEFAULT_ENDPOINT, help=f"server address (default {DEFAULT_ENDPOINT})")
    p.add_argument("--keys", default=None, help="CURVE key folder (server.key + client.key_secret)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")


def _with_client(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """Connect, run ``body(client)``, and turn every client failure into one line and exit code 1."""
    from dreamflow_protocol import Client, ConnectionTimeout, ProtocolError, RequestError
    from dreamflow_protocol.keys import load_client_keys

    try:
        keys = load_client_keys(args.keys) if args.keys else None
    except (OSError, ValueError) as exc:
        print(f"error: cannot read CURVE keys from {args.keys}: {exc}", file=sys.stderr)
        return 1
    client = Client(args.connect, timeout=args.timeout, keys=keys, name="dreamflow-cli")
    try:
        client.connect()
        return body(client)
    except ConnectionTimeout as exc:
        print(f"error: {exc}{_keys_hint(args)}", file=sys.stderr)
        return 1
    except (RequestError, ProtocolError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _keys_hint(args: argparse.Namespace) -> str:
    """Why a server may not have answered: one that needs keys ignores a client without them."""
    from dreamflow_protocol import is_local_endpoint

    if args.keys:
        return (f"; if a server runs there, check that --keys {args.keys} holds its server.key and a client key it "
                f"authorises (a server silently ignores clients whose keys it does not accept)")
    if not is_local_endpoint(args.connect):
        return (f"; {args.connect} is not on this machine, and a remote server needs CURVE keys: pass --keys DIR "
                f"(server.key, client.key and client.key_secret from `dreamflow keys` on the server)")
    return "; if the server was started with --keys, pass --keys DIR too"


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C or SIGTERM."""
    from dreamflow_protocol import Limits

    from ..priors.hub import SERVER_MODE_ENV
    from ..server import Server, ServerConfigError

    # Model names from clients are ids or allowed paths (admission.py); none may probe this machine.
    os.environ[SERVER_MODE_ENV] = "1"
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(max_frame_bytes=args.max_frame_mb * 1024 * 1024,
                    max_message_bytes=max(Limits().max_message_bytes, 2 * args.max_frame_mb * 1024 * 1024))
    try:
        server = Server(args.store, args.bind, max_queue=args.max_queue, limits=limits, keys=args.keys,
                        keep_jobs=args.keep_jobs or None, keep_days=args.keep_days or None, models_dirs=args.models_dir,
                        max_steps=args.max_steps, max_resolution=args.max_resolution,
                        max_queued_bytes=args.max_queued_mb * 1024 * 1024, job_runner=_job_runner(args))
        endpoint = server.open()
    except (ServerConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # zmq.ZMQError (address in use, bad endpoint) and the like
        print(f"error: cannot start the server on {args.bind}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"DreamFlow server listening on {endpoint} (store: {Path(args.store).resolve()}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _job_runner(args: argparse.Namespace) -> Any:
    """The Ray runner's factory under --ray (Ray is imported only then); None: the in-process worker."""
    ray_flags = [f for f, v in (("--job-gpus", args.job_gpus), ("--job-memory", args.job_memory)) if v is not None]
    if args.ray is None:
        if ray_flags:
            raise ValueError(f"{', '.join(ray_flags)} need --ray ADDRESS (jobs run in this process otherwise)")
        return None
    try:
        from ..server.ray_runner import RayOptions, ray_job_runner
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray: pip install 'dreamflow[ray]' ({exc})") from None
    options = RayOptions(address=args.ray, job_gpus=args.job_gpus, job_cpus=args.job_cpus, job_memory_gb=args.job_memory,
                         max_retries=args.job_retries, worker_idle_seconds=args.worker_idle)
    options.check()
    return ray_job_runner(options)


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a server and a client CURVE key pair."""
    from dreamflow_protocol.keys import create_keys

    try:
        root = create_keys(args.out)
    except (OSError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote CURVE keys to {root}:\n"
          f"  server: dreamflow serve --keys {root} (uses server.key_secret and authorized/*.key)\n"
          f"  client: copy server.key, client.key and client.key_secret to the client; --keys <that folder>\n"
          f"  keep *.key_secret private; add more clients by putting their public .key files in authorized/")
    return 0


def _load_mesh(path: str) -> dict[str, Any]:
    import numpy as np
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    arrays = {"vertices": np.ascontiguousarray(mesh.vertices, dtype=np.float32),
              "faces": np.ascontiguousarray(mesh.faces, dtype=np.int32),
              "normals": np.ascontiguousarray(mesh.vertex_normals, dtype=np.float32)}
    uv = getattr(mesh.visual, "uv", None)
    if uv is not None and len(uv) == len(mesh.vertices):
        arrays["uvs"] = np.ascontiguousarray(uv, dtype=np.float32)
        material = getattr(mesh.visual, "material", None)
        image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        if image is not None:  # a PIL image (PBR base colour or a simple material's map)
            arrays["texture"] = np.ascontiguousarray(np.asarray(image.convert("RGB")), dtype=np.uint8)
    return arrays


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job; with --wait follow it to the end (and fetch with --out)."""
    from ..config import ConfigError, parse_cli_overrides

    try:
        overrides = parse_cli_overrides(args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mesh = None
    if args.mesh:
        try:
            mesh = _load_mesh(args.mesh)
        except Exception as exc:
            print(f"error: cannot read mesh {args.mesh}: {exc}", file=sys.stderr)
            return 1

    def body(client: Any) -> int:
        job = client.submit(args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, method=args.method,
                            preset=args.preset, overrides=overrides, mesh=mesh, start_stage=args.start_stage,
                            start_t=args.start_t, subscribe=args.wait)
        print(job, flush=True)
        if not args.wait:
            return 0
        code = _follow(client, job)
        if code == 0 and args.out:
            return _write_results(client, job, args.out)
        return code

    return _with_client(args, body)


def _follow(client: Any, job: str) -> int:
    """Print one updating progress line until the job ends; 0 if it finished."""
    last_heard = time.monotonic()
    while True:
        msg = client.next_event(timeout=1.0)
        if msg is None:
            if not client.connected and time.monotonic() - last_heard > max(10.0, 3 * client.timeout):
                print(f"\nerror: lost the server at {client.endpoint}; the job goes on there "
                      f"(dreamflow status {job})", file=sys.stderr)
                return 1
            continue
        last_heard = time.monotonic()
        if msg.job != job:
            continue
        f = msg.fields
        if msg.type == "progress":
            line = f"[{f['stage']}] step {f['step']}/{f['total']}"
            if f.get("loss") is not None:
                line += f"  loss {f['loss']:.4g}"
            if f.get("eta") is not None:
                line += f"  eta {_duration(f['eta'])}"
            print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)
        elif msg.type == "stage_done":
            print(f"\r{'[' + f['stage'] + '] done':<72}", file=sys.stderr, flush=True)
        elif msg.type == "log" and f["level"] in ("warning", "error"):
            print(f"\n{f['level']}: {f['message']}", file=sys.stderr, flush=True)
        elif msg.type == "job_done":
            print(f"\rjob {job} done in {_duration(f.get('seconds', 0.0))}: {', '.join(f['files'])}".ljust(72), file=sys.stderr)
            return 0
        elif msg.type == "cancelled":
            print(f"\njob {job} cancelled: {f['reason']}", file=sys.stderr)
            return 1
        elif msg.type == "error":
            print(f"\nerror: job {job} failed: {f['message']}", file=sys.stderr)
            return 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _write_results(client: Any, job: str, out: str) -> int:
    files = client.fetch(job, timeout=max(client.timeout, 60.0))
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = (root / name).resolve()
        if root not in path.parents:  # the protocol forbids such names; never trust a peer anyway
            print(f"error: the server sent a file name outside {root}: {name!r}", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        with open(tmp, "wb") as fh:
            fh.write(data.data)  # the received frame's memory, written without a copy
        os.replace(tmp, path)
        print(path)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a job's summary, or the server's summary and its recent jobs."""

    def body(client: Any) -> int:
        if args.job:
            print(json.dumps(client.status(args.job), indent=1, sort_keys=True))
            return 0
        server = client.status()
        running = server.get("running_jobs") or ([server["running"]] if server.get("running") else [])
        where = ""
        if server.get("runner") == "ray":
            free = server.get("free") or {}
            where = f"; Ray at {server.get('ray_address')}: {server.get('slots')} jobs at once, {free.get('GPU', 0):g} GPU free"
        print(f"server {server['server_id'][:8]} v{server['version']}, up {_duration(server['uptime'])}, "
              f"{server['queued']}/{server['max_queue']} queued, running: {', '.join(running) or 'nothing'}{where}")
        for job in client.list_jobs(limit=20):
            step = f"{job['stage']} {job['step']}/{job['total']}" if job.get("stage") else ""
            print(f"{job['job']}  {job['state']:<10} {step:<20} {job['prompt'][:60]}")
        return 0

    return _with_client(args, body)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job."""

    def body(client: Any) -> int:
        summary = client.cancel(args.job)
        print(f"job {args.job}: {summary.get('state')}")
        return 0

    return _with_client(args, body)


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download a finished job's files."""
    return _with_client(args, lambda client: _write_results(client, args.job, args.out))
