"""Optional CUDA accelerators, chosen in this one place and imported lazily.

tinycudann (hash grid) and nvdiffrast (rasteriser) only exist on CUDA machines. Nothing imports
them at module import time; parts ask here and fall back to their pure-PyTorch twins, which give
the same numbers within tolerance (tests compare them where both exist).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

#: Set DREAMFLOW_NO_ACCEL=1 to force the pure-PyTorch twins (comparisons, debugging).
_DISABLED = os.environ.get("DREAMFLOW_NO_ACCEL", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA extension that fails to load on this machine
        return None


def tinycudann(device: torch.device | str) -> ModuleType | None:
    """The tinycudann module when it is installed and ``device`` is CUDA, else None."""
    if _DISABLED or torch.device(device).type != "cuda":
        return None
    return _try_import("tinycudann")


def nvdiffrast(device: torch.device | str) -> ModuleType | None:
    """``nvdiffrast.torch`` when it is installed and ``device`` is CUDA, else None."""
    if _DISABLED or torch.device(device).type != "cuda":
        return None
    return _try_import("nvdiffrast.torch")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available on this machine")
    return dev


def report() -> dict[str, bool]:
    """Which accelerators this machine would use (the server's capabilities message)."""
    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "tinycudann": cuda and tinycudann("cuda") is not None,
        "nvdiffrast": cuda and nvdiffrast("cuda") is not None,
    }
