"""What the stages of one job share: settings, the event sink, the prior cache and the current asset.

A stage runner is a plain function ``run(ctx: JobContext) -> None``. It reads what earlier stages
left (``ctx.mesh``, ``ctx.nerf``), puts its own result back, records its seconds, metrics and loss
history, and emits events through ``ctx.sink``. ``ctx.render_views`` is the latest representation's
renderer (NeRF after stage 1, textured mesh after stages 2-3), used for turntables and metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..events import EventSink, JobControl
from ..export.mesh import MeshData
from ..methods.loop import StepReport
from ..safe_files import atomic_write, open_read
from ..scene.cameras import Cameras
from .config import JobConfig


@dataclass
class StageRecord:
    """One finished stage: wall seconds, quality metrics and the per-step history."""

    seconds: float
    metrics: dict[str, float]
    history: list[StepReport]


@dataclass
class JobContext:
    """The state of one job while its stages run."""

    config: JobConfig
    out_dir: Path
    sink: EventSink
    control: JobControl
    device: torch.device
    checkpoint_dir: Path | None = None
    input_mesh: MeshData | None = None
    start_t: float | None = None
    mesh: MeshData | None = None                      # the current textured asset
    nerf: Any = None                                  # stage 1's field (density/albedo), for stage 2
    render_views: Callable[[Cameras, int], torch.Tensor] | None = None  # (B, 3, H, W) in [0, 1]
    reference: Any = None                             # ReferenceRenderer when the prior is the reference object
    stages: dict[str, StageRecord] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # priors and score-model bases shared by stages
    stage_names: list[str] = field(default_factory=list)  # the stages this job runs, in order

    def stage_position(self, stage: str) -> dict[str, int]:
        """``stage_index`` (0-based) and ``stage_count`` for progress events."""
        index = self.stage_names.index(stage) if stage in self.stage_names else 0
        return {"stage_index": index, "stage_count": max(1, len(self.stage_names))}

    def emit(self, kind: str, fields: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Send one event to the job's sink."""
        self.sink.emit(kind, fields, arrays)

    def checkpoint_path(self, stage: str) -> Path | None:
        """Where a stage keeps its resumable state (None when the job has no checkpoint folder)."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{stage}.pt"

    def save_checkpoint(self, stage: str, state: dict) -> None:
        """Write a stage's state atomically (temporary file, fsync, rename)."""
        path = self.checkpoint_path(stage)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: torch.save(state, fh))

    def load_checkpoint(self, stage: str) -> dict | None:
        """A stage's saved state, or None."""
        path = self.checkpoint_path(stage)
        if path is None or not (path.is_file() or path.is_symlink()):
            return None
        try:
            with open_read(path) as fh:  # a link planted there is refused, never loaded
                return torch.load(fh, map_location="cpu", weights_only=False)
        except Exception as exc:  # writes are atomic, so this is damage from outside: start the stage afresh
            self.emit("log", {"level": "warning", "stage": stage,
                              "message": f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                                         f"{stage} starts again from its first step"})
            return None


class ProgressTimer:
    """Elapsed and remaining seconds of a stage from its step rate so far."""

    def __init__(self, total: int, done: int = 0):
        self.total = total
        self.start_done = done
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the stage (or its resumed part) started."""
        return time.perf_counter() - self.start

    def eta(self, done: int) -> float:
        """Estimated seconds left after ``done`` of ``total`` steps."""
        ran = done - self.start_done
        if ran <= 0:
            return 0.0
        return self.elapsed() / ran * (self.total - done)
