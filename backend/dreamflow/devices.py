"""Host-to-accelerator copies that do not stall the accelerator's queue.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory, which makes the host wait until
everything queued before it has run: one such copy in the middle of an iteration leaves the GPU
idle while Python launches the next kernels. The per-iteration draws (noise, cameras, noise
levels) are made on the CPU on purpose (the same seeded streams on every device), so they travel
through pinned memory, asynchronously.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to CUDA through pinned memory without a sync."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    # A pageable tensor is first copied into a fresh pinned block, so later host writes to ``t``
    # cannot race the transfer (an already pinned one is copied as it is: callers pass fresh
    # draws); the caching host allocator keeps the block until the copy has finished.
    return t.pin_memory().to(device, non_blocking=True)


def host_value(t: torch.Tensor) -> float:
    """The value of a 0-dim *host* tensor (no device read); a device tensor is a bug and raises."""
    if t.device.type != "cpu":
        raise ValueError(f"host_value() reads host tensors only; this one is on {t.device} (a device sync)")
    return float(t)


def host_list(t: torch.Tensor) -> list:
    """The values of a *host* tensor as a list (no device read); a device tensor raises."""
    if t.device.type != "cpu":
        raise ValueError(f"host_list() reads host tensors only; this one is on {t.device} (a device sync)")
    return t.tolist()
