"""Host-to-accelerator copies that do not stall the accelerator's queue, and what the CPU runs fast.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory, which makes the host wait until
everything queued before it has run: one such copy in the middle of an iteration leaves the GPU
idle while Python launches the next kernels. The per-iteration draws (noise, cameras, noise
levels) are made on the CPU on purpose (the same seeded streams on every device), so they travel
through pinned memory, asynchronously.

bfloat16 on a CPU without bf16 instructions is emulated, and far slower than float32:
:func:`cpu_has_native_bf16` is the one place that decides whether this CPU has them.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: float32 / bfloat16 matmul throughput on a CPU without native bf16, as measured for issue 24 on a
#: 2-core AVX2 AMD EPYC: 64.5 vs 0.92 GFLOPS.
SLOW_BF16_GFLOPS = (64.5, 0.92)
_X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which its kernels still have bf16 instructions.
_ONEDNN_BF16_ISAS = ("BF16", "AMX", "AVX10", "ALL", "DEFAULT")
_warned_slow_bf16: set[str] = set()


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether PyTorch runs bfloat16 on this CPU with bf16 instructions (AVX512-BF16 or AMX on x86,
    BF16 on Arm) rather than emulating it, honouring ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``."""
    isa_limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa_limit and not any(name in isa_limit for name in _ONEDNN_BF16_ISAS):
        return False
    capability = torch.backends.cpu.get_cpu_capability()  # reads ATEN_CPU_CAPABILITY
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return capability.startswith("AVX512") and bool(_X86_BF16_FLAGS & flags)


def warn_if_slow_bf16(device: torch.device) -> bool:
    """Log once per process, in one line, that bfloat16 on this CPU is emulated; whether it is."""
    if device.type != "cpu" or cpu_has_native_bf16():
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _warned_slow_bf16:
        _warned_slow_bf16.add(capability)
        fp32, bf16 = SLOW_BF16_GFLOPS
        log.warning("bfloat16 on this CPU (%s, no native bf16) is emulated: about %.0fx slower than float32 "
                    "(%.1f vs %.2f GFLOPS measured on a 2-core AVX2 EPYC); set the dtype to auto or float32",
                    capability, fp32 / bf16, fp32, bf16)
    return True


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
