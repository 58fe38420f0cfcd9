"""Falling back instead of failing when accelerator memory runs out.

The policy: an iteration that raises an out-of-memory error is retried after the next saver of a
:class:`MemoryLadder` has been applied (smaller ray chunks, activation recomputation in the VAE
encoder and the UNet, VAE tiling), one saver per failure, until it fits or the ladder is empty;
only then does the error reach the job. Savers change memory, not the method: each one gives the
same numbers within tolerance (tests compare them), at some extra compute.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (CUDA's, or a backend's RuntimeError saying so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Drop unreachable tensors and return cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Saver:
    """One memory saver: ``apply()`` makes the next attempt smaller; False when it can do no more."""

    name: str
    apply: Callable[[], bool]


@dataclass
class MemoryLadder:
    """Savers in the order they are tried (cheapest in extra compute first)."""

    savers: list[Saver]
    applied: list[str] = field(default_factory=list)

    def degrade(self) -> str | None:
        """Apply the first saver that still can do something; its name, or None when none can."""
        for saver in self.savers:
            if saver.apply():
                self.applied.append(saver.name)
                return saver.name
        return None


def retry_on_oom(attempt: Callable[[], T], ladder: MemoryLadder,
                 on_fallback: Callable[[str, str], None] | None = None) -> T:
    """``attempt()``; after an out-of-memory error, degrade one step and try again."""
    while True:
        try:
            return attempt()
        except BaseException as exc:  # noqa: B902 - only OOM is handled, everything else re-raised
            if not is_oom(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        free_memory()
        what = ladder.degrade()
        if what is None:
            raise torch.OutOfMemoryError(
                f"out of memory even after every fallback ({', '.join(ladder.applied) or 'none applied'}): {message}")
        if on_fallback is not None:
            on_fallback(what, message)


def install_oom_fallback(loop: Any, ladder: MemoryLadder,
                         on_fallback: Callable[[str, str], None] | None = None) -> None:
    """Make ``loop.step`` (a :class:`~dreamflow.methods.loop.Distillation`) retry an iteration that
    ran out of memory with the next saver applied; the loop itself is unchanged otherwise.

    A retried iteration draws fresh cameras and noise, and if the error came after D_phi's update
    that update has happened once already: a fallback is rare (the first iterations, once), so
    this costs one extra LoRA step, not correctness."""
    step = loop.step

    def guarded(info):
        def attempt():
            try:
                return step(info)
            except BaseException:
                # Gradients of a half-done backward must not leak into the retried step.
                loop.optimiser.zero_grad(set_to_none=True)
                raise

        return retry_on_oom(attempt, ladder, on_fallback)

    loop.step = guarded


def halving(get: Callable[[], int | None], set_: Callable[[int], None], start: int, minimum: int) -> Callable[[], bool]:
    """A saver that sets a chunk size to ``start`` the first time, then halves it down to ``minimum``."""

    def apply() -> bool:
        current = get()
        if current is None:
            set_(start)
            return True
        if current // 2 < minimum:
            return False
        set_(current // 2)
        return True

    return apply


def once(action: Callable[[], None]) -> Callable[[], bool]:
    """A saver that applies ``action`` the first time and reports nothing left to do afterwards."""
    state = {"done": False}

    def apply() -> bool:
        if state["done"]:
            return False
        action()
        state["done"] = True
        return True

    return apply


def prior_savers(prior: Any, score_model: Any = None) -> list[Saver]:
    """Savers for a latent diffusion prior (and the UNet its LoRA score model trains on).

    VAE-encoder recomputation first (the encode of a 512/1024 render keeps the largest activations
    for its backward), then UNet recomputation in the LoRA update, then VAE tiling (only changes
    anything above the VAE's tile size; the result differs slightly at the tile seams).
    """
    savers: list[Saver] = []
    vae = getattr(prior, "vae", None)
    if vae is not None:
        savers.append(Saver("vae-grad-checkpointing", once(vae.enable_gradient_checkpointing)))
    base = getattr(score_model, "base", None)
    unet = getattr(base, "unet", None)
    if unet is not None and getattr(score_model, "trainable", False):
        savers.append(Saver("unet-grad-checkpointing", once(unet.enable_gradient_checkpointing)))
    if vae is not None and hasattr(vae, "enable_tiling"):
        savers.append(Saver("vae-tiling", once(vae.enable_tiling)))
    return savers
