"""The memory plan of the stages: what each one needs at the paper's settings, and the fallbacks
that make it fit (stages 1 and 2 in 24 GB, stage 3 in 40 GB) instead of failing.

- Stage 1's training render is the big one: the pure-PyTorch hash grid keeps about 4 kB of
  activations per sample for its backward, and 256x256 rays x 512 samples is 33.5 M samples.
  :class:`ChunkedNerfProblem` renders in checkpointed ray chunks (render/checkpointed.py) sized
  to a byte budget, and halves the chunk after an out-of-memory error.
- The VAE encode of a 512 (stages 1-2) or 1024 (stage 3) render with gradients comes next:
  activation recomputation in the encoder (same numbers), then tiling.
- The LoRA update's backward through the UNet: activation recomputation in the UNet.

:func:`install_stage_fallback` puts those savers, in that order, behind the loop's step
(memory.install_oom_fallback): an iteration that runs out of memory is retried one saver later.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..memory import MemoryLadder, Saver, halving, install_oom_fallback, prior_savers
from ..methods.loop import Rendered
from ..render.checkpointed import render_cameras_checkpointed
from ..scene.cameras import Cameras
from .stage1 import NerfProblem

#: Bytes per evaluated sample and hash-grid level while a chunk's graph is alive. The tensors the
#: pure-PyTorch grid and the NeRF MLP save for backward measure 129 B per level (16 levels x 4
#: features; tests/bench/test_memory.py keeps this constant above the measurement); the rest is
#: headroom for the forward's temporaries (corner indices before hashing) and the compositing.
BYTES_PER_SAMPLE_PER_LEVEL = 240
MIN_RAY_CHUNK = 256


def ray_chunk_for_budget(budget_bytes: int, samples_per_ray: int, levels: int) -> int:
    """Rays per checkpointed chunk so that one chunk's graph stays within ``budget_bytes``."""
    per_ray = max(1, samples_per_ray * levels * BYTES_PER_SAMPLE_PER_LEVEL)
    rays = budget_bytes // per_ray
    # A power of two keeps halving exact; never below the minimum.
    power = 1 << max(0, int(rays).bit_length() - 1)
    return max(MIN_RAY_CHUNK, power)


def plan_ray_chunk(rays: int, samples_per_ray: int, levels: int, budget_bytes: int) -> int | None:
    """None when the whole training render's graph fits ``budget_bytes``, else the chunk that does."""
    if rays * samples_per_ray * levels * BYTES_PER_SAMPLE_PER_LEVEL <= budget_bytes:
        return None
    return ray_chunk_for_budget(budget_bytes, samples_per_ray, levels)


class ChunkedNerfProblem(NerfProblem):
    """Stage 1's problem with a bounded-memory training render.

    ``ray_chunk`` None renders all rays in one graph (the plain NerfProblem); a number renders that
    many rays per checkpointed chunk: the same image and the same gradients within float tolerance.
    """

    def __init__(self, *args: Any, ray_chunk: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ray_chunk = ray_chunk

    @classmethod
    def wrap(cls, problem: NerfProblem, ray_chunk: int | None = None) -> "ChunkedNerfProblem":
        """The same field, occupancy grid and generator as ``problem``, rendered in chunks."""
        new = cls.__new__(cls)
        new.__dict__.update(problem.__dict__)
        new.ray_chunk = ray_chunk
        return new

    def render(self, cameras: Cameras | None) -> Rendered:
        """Training render; in checkpointed chunks when ``ray_chunk`` is set."""
        if self.ray_chunk is None:
            return super().render(cameras)
        c = self.cfg
        out = render_cameras_checkpointed(self.field, cameras, c.resolution, c.resolution, c.samples_per_ray,
                                          self.occupancy, perturb=True, generator=self.generator,
                                          orientation=c.orientation_weight > 0, chunk=self.ray_chunk)
        reg = c.orientation_weight * out.orientation if c.orientation_weight > 0 else None
        return Rendered(out.image, out.alpha, reg)


def stage_ladder(problem: Any, prior: Any, score_model: Any, first_ray_chunk: int = 8192,
                 min_ray_chunk: int = MIN_RAY_CHUNK) -> MemoryLadder:
    """The savers of a stage, cheapest first: ray chunks (stage 1), then the prior's savers."""
    savers: list[Saver] = []
    if isinstance(problem, ChunkedNerfProblem):
        savers.append(Saver("halve-ray-chunk", halving(lambda: problem.ray_chunk,
                                                       lambda v: setattr(problem, "ray_chunk", v),
                                                       first_ray_chunk, min_ray_chunk)))
    savers += prior_savers(prior, score_model)
    return MemoryLadder(savers)


def install_stage_fallback(loop: Any, on_fallback: Callable[[str, str], None] | None = None,
                           first_ray_chunk: int = 8192, min_ray_chunk: int = MIN_RAY_CHUNK) -> MemoryLadder:
    """Retry out-of-memory iterations of ``loop`` with its stage's savers; the ladder (its
    ``applied`` list says what was needed)."""
    ladder = stage_ladder(loop.problem, loop.prior, loop.score_model, first_ray_chunk, min_ray_chunk)
    install_oom_fallback(loop, ladder, on_fallback)
    return ladder


def gpu_budget_bytes(device: torch.device, fraction: float = 0.25) -> int:
    """A ray-chunk budget: ``fraction`` of the device's total memory (CUDA), 2 GiB elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * fraction)
    return 2 << 30
