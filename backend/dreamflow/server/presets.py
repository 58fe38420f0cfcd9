"""Which presets this server can run, and why not: the capabilities' ``preset_details``.

A preset cannot run here when it needs a CUDA device the server's jobs lack, or diffusion weights
that are not on this machine (looked up in the Hugging Face cache and local folders, never online).
Jobs of a Ray cluster (``serve --ray``) run on its nodes: their device is the runner's per-job GPU
share, and their weights are on the nodes' disks, which the front door cannot see (not checked).
A preset whose prior is the toy world's model also publishes the world's words, so a client can
say before sending what a prompt will become, or that it will be refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from .. import accel

#: Presets whose settings are meant for a GPU: the paper's 11,300 steps at 256-1024 px with Stable
#: Diffusion and the SDXL refiner take days on a CPU.
CUDA_PRESETS = frozenset({"paper"})


def serving_device(runner_facts: Mapping[str, Any] | None = None) -> str:
    """The device type jobs run on ("cuda" or "cpu"): a cluster runner's per-job GPU share, else this
    process's ``device=auto`` choice. ``runner_facts``: the job runner's ``describe()``."""
    gpus = ((runner_facts or {}).get("job_resources") or {}).get("GPU")
    if gpus is not None:
        return "cuda" if gpus > 0 else "cpu"
    return accel.pick_device("auto").type


def preset_detail(preset: str, device_type: str, check_weights: bool = True) -> dict[str, Any]:
    """Whether ``preset`` can run on a ``device_type`` server, with the reason and the fix when it cannot
    (weights on this machine are looked for unless ``check_weights`` is off)."""
    from ..pipeline.config import build_config
    from ..pipeline.models import model_states
    from ..toyworld.world import is_toyworld_model, model_vocabulary

    config = build_config(preset)
    reasons, fixes = [], []
    if preset in CUDA_PRESETS and device_type != "cuda":
        reasons.append("this server has no CUDA device (the paper's settings take days on a CPU)")
        fixes.append("choose another preset, or use a server with an NVIDIA GPU")
    missing = [s.need for s in model_states(config, device_type) if s.files is None] if check_weights else []
    if missing:
        reasons.append("weights not on this server: " + ", ".join(f"{n.model} ({n.role})" for n in missing))
        fixes.append(f"run `dreamflow models fetch --preset {preset}` on the server")
    detail: dict[str, Any] = {"runnable": not reasons}
    if reasons:
        detail.update(reason="; ".join(reasons), fix="; ".join(fixes))
    if config.prior.kind == "stable-diffusion" and is_toyworld_model(config.prior.model):
        detail["prompts"] = model_vocabulary(config.prior.model).as_fields()
    return detail


def preset_details(device_type: str | None = None, runner_facts: Mapping[str, Any] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """:func:`preset_detail` of every preset, for the device jobs run on unless ``device_type`` is given."""
    from ..pipeline.config import PRESETS

    device_type = device_type or serving_device(runner_facts)
    local = (runner_facts or {}).get("runner", "in-process") == "in-process"
    return {name: preset_detail(name, device_type, check_weights=local) for name in PRESETS}
