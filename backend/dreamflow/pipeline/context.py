"""What the stages of one job share: settings, the event sink, the prior cache and the current asset.

What stages hand each other is not kept here: a stage takes the previous stage's typed result
and returns its own (pipeline/handoff.py, pipeline/stage_loop.py). The context holds what the
whole job shares: settings, events, control, checkpoints, the reference object, the diffusion
models loaded once for all stages (``cache``, pipeline/components.py), the frame of a given
input mesh, and each finished stage's record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..events import EventSink, JobControl
from ..export.mesh import MeshData
from ..methods.loop import StepReport
from ..safe_files import atomic_write, open_read
from .config import JobConfig

if TYPE_CHECKING:
    from .refine_input import InputFrame


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
    reference: Any = None                             # ReferenceRenderer when the prior is the reference object
    input_frame: "InputFrame | None" = None           # how a given input mesh was moved into the object box
    stages: dict[str, StageRecord] = field(default_factory=dict)
    # The diffusion models loaded once and shared by the stages ("prior", "phi_base", "refiner";
    # components.py). Nothing else: stage outputs travel as typed results (handoff.py).
    cache: dict[str, Any] = field(default_factory=dict)
    stage_names: list[str] = field(default_factory=list)  # the stages this job runs, in order

    def output_mesh(self, mesh: MeshData) -> MeshData:
        """A mesh as the job sends it: back in the input's coordinates when the input was moved into the box."""
        return mesh if self.input_frame is None else self.input_frame.from_box(mesh)

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
