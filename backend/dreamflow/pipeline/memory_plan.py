"""The memory plan of the stages: what each one needs at the paper's settings, and the fallbacks
that make it fit (stages 1 and 2 in 24 GB, stage 3 in 40 GB) instead of failing.

- Stage 1's training render is the big one: the pure-PyTorch hash grid keeps about 4 kB of
  activations per sample for its backward, and 256x256 rays x 512 samples is 33.5 M samples.
  Stage 1's problem renders in checkpointed ray chunks (render/checkpointed.py) sized to a byte
  budget (:func:`plan_ray_chunk`), and halves the chunk after an out-of-memory error.
- The VAE encode of a 512 (stages 1-2) or 1024 (stage 3) render with gradients comes next:
  activation recomputation in the encoder (same numbers), then tiling.
- The LoRA update's backward through the UNet: activation recomputation in the UNet.

:func:`install_stage_fallback` puts those savers, in that order, behind the loop's step
(memory.install_oom_fallback): an iteration that runs out of memory is retried one saver later.
This module imports nothing from the pipeline's stages (they import it).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from ..memory import MemoryLadder, Saver, halving, install_oom_fallback, prior_savers

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


@runtime_checkable
class RayChunked(Protocol):
    """A problem that renders in checkpointed chunks of ``ray_chunk`` rays (None: all in one graph);
    stage 1's NerfProblem is one."""

    ray_chunk: int | None


def stage_ladder(problem: Any, prior: Any, score_model: Any, first_ray_chunk: int = 8192,
                 min_ray_chunk: int = MIN_RAY_CHUNK) -> MemoryLadder:
    """The savers of a stage, cheapest first: ray chunks (stage 1), then the prior's savers."""
    savers: list[Saver] = []
    if isinstance(problem, RayChunked):
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
