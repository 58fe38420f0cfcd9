"""Job runners for protocol-level server tests: real CPU work in steps, honouring JobControl.

They stand in for the pipeline where a test is about the server (latency, cancel, queue,
resume), not about generation; one end-to-end test runs the real pipeline.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np


class StepResult:
    """What run_job returns: result files relative to out_dir, and a report."""

    def __init__(self, files: dict[str, str], report: dict[str, Any]) -> None:
        self.files = files
        self.report = report


def cube_mesh(scale: float = 1.0) -> dict[str, np.ndarray]:
    """A unit cube's arrays, named like MeshData.arrays()."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32) * scale
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.int32)
    return {"vertices": v, "faces": f, "normals": v / np.linalg.norm(v, axis=1, keepdims=True),
            "uvs": (v[:, :2] * 0.5 + 0.5).astype(np.float32), "texture": np.full((8, 8, 3), 200, np.uint8)}


class StepRunner:
    """Runs ``steps`` optimisation-like steps of ``step_seconds`` of numpy work each.

    Emits progress every step, a preview every 2 and a mesh every 3 steps, checkpoints its step
    in checkpoint_dir (so a restarted server resumes where it stopped), writes model.glb-like
    bytes and report.json at the end. ``fail_at`` raises at that step; ``started`` is set when
    the first step begins.
    """

    def __init__(self, steps: int = 6, step_seconds: float = 0.02, fail_at: int | None = None) -> None:
        self.steps = steps
        self.step_seconds = step_seconds
        self.fail_at = fail_at
        self.started = threading.Event()
        self.calls: list[dict[str, Any]] = []

    def __call__(self, config: Any, out_dir: Path, sink: Any, control: Any, *, input_mesh: Any = None,
                 start_stage: str | None = None, start_t: float | None = None, checkpoint_dir: Path | None = None) -> StepResult:
        self.calls.append({"prompt": config.prompt, "seed": config.seed, "method": config.method,
                           "input_mesh": input_mesh, "start_stage": start_stage, "start_t": start_t})
        ckpt = Path(checkpoint_dir) / "step.json" if checkpoint_dir else None
        first = json.loads(ckpt.read_text())["step"] if ckpt and ckpt.exists() else 0
        rng = np.random.default_rng(config.seed)
        a = rng.random((96, 96))
        self.started.set()
        for step in range(first, self.steps):
            control.check()
            if self.fail_at == step:
                raise RuntimeError(f"synthetic failure at step {step}")
            _busy(a, self.step_seconds)
            sink.emit("progress", {"stage": "stage1", "step": step + 1, "total": self.steps, "loss": float(a[0, 0]),
                                   "eta": self.step_seconds * (self.steps - step - 1)})
            if step % 2 == 1:
                sink.emit("preview", {"stage": "stage1", "step": step + 1},
                          {"image": np.full((8, 8, 3), step, np.uint8)})
            if step % 3 == 2:
                sink.emit("mesh", {"stage": "stage1", "step": step + 1}, cube_mesh(1.0 + step))
            if ckpt is not None:
                ckpt.write_text(json.dumps({"step": step + 1}))
        sink.emit("stage_done", {"stage": "stage1", "steps": self.steps})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.glb").write_bytes(b"glTF" + bytes(range(256)) * 4)
        (out / "report.json").write_text(json.dumps({"prompt": config.prompt}))
        return StepResult({"glb": "model.glb", "report": "report.json"}, {"steps": self.steps, "resumed_from": first})


def _busy(a: np.ndarray, seconds: float) -> None:
    """Real CPU work for about ``seconds`` (matrix products), not a sleep."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = np.tanh(a @ a.T * 1e-2)
