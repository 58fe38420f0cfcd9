"""The real DreamFlow server (``dreamflow.server.Server``) with a scripted stand-in for the pipeline.

The add-on tests need jobs whose output is known exactly (to check what arrives in Blender) and
whose length is chosen by the test (to cancel one mid-way). The server, its job store, the
protocol and the client are the real ones; only the runner is replaced. The runner emits what
``dreamflow.pipeline.job.run_job`` emits: progress, preview images, meshes with UVs and a texture,
stage_done; for a refinement it sends the received input mesh back unchanged (so a test can check
the round trip), with its texture if it had one.

    python scripted_server.py --bind tcp://127.0.0.1:PORT --store DIR [--step-seconds S] [--later-meshes N]
                              [--device-type cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ScriptedResult:
    """What the worker reads from a runner's result."""

    files: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def scripted_mesh(step: int, texture_size: int = 64) -> dict[str, np.ndarray]:
    """A UV-mapped grid whose height and texture depend on ``step`` (known to the tests)."""
    n = 9
    xs, ys = np.meshgrid(np.linspace(-1, 1, n, dtype=np.float32), np.linspace(-1, 1, n, dtype=np.float32))
    z = np.full_like(xs, 0.1 * step)
    vertices = np.stack([xs.ravel(), ys.ravel(), z.ravel()], axis=1)
    idx = np.arange(n * n, dtype=np.int32).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.int32)
    normals = np.tile(np.array([0, 0, 1], np.float32), (n * n, 1))
    uvs = np.stack([(xs.ravel() + 1) / 2, (ys.ravel() + 1) / 2], axis=1).astype(np.float32)
    texture = np.zeros((texture_size, texture_size, 3), np.uint8)
    texture[: texture_size // 2] = (255, 0, 0)      # top half red: the row order is checked in Blender
    texture[texture_size // 2:] = (0, 0, 255)
    texture[..., 1] = min(255, 40 * step)
    return {"vertices": vertices, "faces": faces, "normals": normals, "uvs": uvs, "texture": texture}


def scripted_runner(config: Any, out_dir: Any, sink: Any, control: Any, *, input_mesh: Any = None,
                    start_stage: str | None = None, start_t: float | None = None, checkpoint_dir: Any = None,
                    step_seconds: float = 0.05, later_meshes: int = 0) -> ScriptedResult:
    """Emit ``config.stage1.steps`` steps of progress/preview, a mesh every other step, then the final mesh.

    With ``later_meshes`` > 0 it behaves like a job of several stages, each ending in a final mesh:
    stage 1's final mesh (texture of step ``total``), then a texture stage of ``later_meshes``
    meshes (textures of steps ``total + 1`` ...), the last one final. A refinement then sends its
    input back with the colours of its texture inverted (so a new texture is told from the old).
    """
    stage = start_stage or "stage1"
    total = int(config.stage1.steps)
    for step in range(1, total + 1):
        control.check()
        time.sleep(step_seconds)
        sink.emit("progress", {"stage": stage, "step": step, "total": total, "loss": 1.0 / step,
                               "eta": step_seconds * (total - step)})
        sink.emit("preview", {"stage": stage, "step": step}, {"image": np.full((16, 16, 3), 10 * step % 256, np.uint8)})
        if input_mesh is None and step % 2 == 0:
            sink.emit("mesh", {"stage": stage, "step": step, "final": False}, scripted_mesh(step))
    control.check()
    if input_mesh is not None:
        arrays = {k: v for k, v in input_mesh.arrays().items()}
        if later_meshes and arrays.get("texture") is not None:
            arrays["texture"] = arrays["texture"].copy()
            arrays["texture"][..., :3] = 255 - arrays["texture"][..., :3]
        sink.emit("mesh", {"stage": "export", "step": total, "final": True}, arrays)
    elif later_meshes:
        sink.emit("mesh", {"stage": stage, "step": total, "final": True}, scripted_mesh(total))
        for k in range(1, later_meshes + 1):
            control.check()
            time.sleep(step_seconds)
            sink.emit("mesh", {"stage": "texture", "step": k, "final": k == later_meshes}, scripted_mesh(total + k))
    else:
        sink.emit("mesh", {"stage": "export", "step": total, "final": True}, scripted_mesh(total))
    sink.emit("stage_done", {"stage": stage, "steps": total, "seconds": step_seconds * total})
    return ScriptedResult(report={"start_t": start_t})


def main() -> None:
    """Serve until terminated."""
    from functools import partial

    from dreamflow.server.server import Server

    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--step-seconds", type=float, default=0.05)
    p.add_argument("--later-meshes", type=int, default=0, help="meshes of a texture stage after stage 1's final one")
    p.add_argument("--device-type", choices=("cpu", "cuda"), default=None,
                   help="the device the capabilities say jobs run on (cuda: a GPU server faked on a machine without one)")
    args = p.parse_args()
    if args.device_type:
        from dreamflow.server import presets

        presets.serving_device = lambda facts=None: args.device_type  # the one function the capabilities ask
    server = Server(args.store, args.bind, runner=partial(scripted_runner, step_seconds=args.step_seconds,
                                                          later_meshes=args.later_meshes))
    server.open()
    print("listening", server.endpoint, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
