"""Which presets this server can run, and why not: the capabilities' ``preset_details``.

A preset cannot run here when it needs a CUDA device the server lacks, or diffusion weights that
are not on this machine (looked up in the Hugging Face cache and local folders, never online).
A preset whose prior is the toy world's model also publishes the world's words, so a client can
say before sending what a prompt will become, or that it will be refused.
"""

from __future__ import annotations

from typing import Any

from .. import accel

#: Presets whose settings are meant for a GPU: the paper's 11,300 steps at 256-1024 px with Stable
#: Diffusion and the SDXL refiner take days on a CPU.
CUDA_PRESETS = frozenset({"paper"})


def serving_device() -> str:
    """The device type jobs run on here ("cuda" or "cpu"): the pipeline's ``device=auto`` choice."""
    return accel.pick_device("auto").type


def preset_detail(preset: str, device_type: str) -> dict[str, Any]:
    """Whether ``preset`` can run on a ``device_type`` server, with the reason and the fix when it cannot."""
    from ..pipeline.config import build_config
    from ..pipeline.models import model_states
    from ..toyworld.world import VOCABULARY, is_toyworld_model

    config = build_config(preset)
    reasons, fixes = [], []
    if preset in CUDA_PRESETS and device_type != "cuda":
        reasons.append("this server has no CUDA device (the paper's settings take days on a CPU)")
        fixes.append("choose another preset, or use a server with an NVIDIA GPU")
    missing = [s.need for s in model_states(config, device_type) if s.files is None]
    if missing:
        reasons.append("weights not on this server: " + ", ".join(f"{n.model} ({n.role})" for n in missing))
        fixes.append(f"run `dreamflow models fetch --preset {preset}` on the server")
    detail: dict[str, Any] = {"runnable": not reasons}
    if reasons:
        detail.update(reason="; ".join(reasons), fix="; ".join(fixes))
    if config.prior.kind == "stable-diffusion" and is_toyworld_model(config.prior.model):
        detail["prompts"] = VOCABULARY.as_fields()
    return detail


def preset_details(device_type: str | None = None) -> dict[str, dict[str, Any]]:
    """:func:`preset_detail` of every preset, for this server's device unless ``device_type`` is given."""
    from ..pipeline.config import PRESETS

    device_type = device_type or serving_device()
    return {name: preset_detail(name, device_type) for name in PRESETS}
