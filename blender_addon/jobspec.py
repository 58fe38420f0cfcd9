"""The panel's settings as a protocol job spec; pure Python (no ``bpy``), so it is testable anywhere.

The backend's typed configuration (``dreamflow.pipeline.config.JobConfig``) is overridden by
dotted paths; this module names those paths once. A stage the artist did not customise sends only
its ``enabled`` flag, so the chosen preset's values apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

# The one rule of what stays on this machine, shared with the server (bundled in the protocol wheel).
from dreamflow_protocol.endpoints import is_local_endpoint  # noqa: F401  (used as jobspec.is_local_endpoint)
# The server's reading of a toy-world prompt, applied here to the words the server publishes.
from dreamflow_protocol.prompts import UnknownToyPrompt, Vocabulary, read_toy_prompt

#: Pipeline stages in order, as the job spec names them.
STAGES: tuple[str, ...] = ("stage1", "geometry", "texture", "refine")
STAGE_LABELS: dict[str, str] = {"stage1": "Stage 1: NeRF", "geometry": "Stage 2: geometry",
                                "texture": "Stage 2: texture", "refine": "Stage 3: refinement"}
#: Stages a refinement of an existing mesh can start from.
START_STAGES: tuple[str, ...] = ("geometry", "texture", "refine")
METHODS: tuple[str, ...] = ("apfo", "vsd", "sds", "fsd")
#: The panel's presets. "Preview" is text to 3D on a CPU with the toy world's trained prior (the
#: backend's ``toy`` preset: the prompt decides the object); "Reference" is the weight-free demo that
#: rebuilds a reference object whatever the prompt says (the backend's ``preview``).
PRESETS: tuple[str, ...] = ("paper", "preview", "reference", "smoke")
#: The backend preset each panel preset sends (the panel's names stay stable in saved .blend files).
BACKEND_PRESETS: dict[str, str] = {"paper": "paper", "preview": "toy", "reference": "preview", "smoke": "smoke"}
#: The panel's name of each preset, as the artist reads it in messages.
PRESET_LABELS: dict[str, str] = {"paper": "Paper", "preview": "Preview", "reference": "Reference", "smoke": "Smoke"}
#: The valid range of each stage setting the panel edits: the backend's declared ranges
#: (``dreamflow.pipeline.config``), copied because the add-on never imports the backend; a test
#: keeps the two equal. Everything else (extra overrides) is checked by the server, whose error
#: names the setting and its range.
STAGE_LIMITS: dict[str, tuple[float, float]] = {"resolution": (16, 4096), "views_per_t": (1, 64), "steps": (1, 100_000),
                                                "t_start": (0.0, 1.0), "t_end": (0.0, 1.0)}


@dataclass(frozen=True)
class StageSettings:
    """One stage as the panel holds it."""

    enabled: bool = True
    customize: bool = False
    resolution: int = 64
    t_start: float = 1.0
    t_end: float = 0.2
    views_per_t: int = 1
    steps: int = 100


def stage_overrides(name: str, stage: StageSettings) -> dict[str, Any]:
    """The dotted overrides of one stage (only ``enabled`` unless the stage is customised)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    out: dict[str, Any] = {f"{name}.enabled": bool(stage.enabled)}
    if stage.enabled and stage.customize:
        if not 0.0 <= stage.t_end <= stage.t_start <= 1.0:
            raise ValueError(f"{STAGE_LABELS[name]}: need 0 <= t end <= t start <= 1 "
                             f"(got t start {stage.t_start:g}, t end {stage.t_end:g})")
        out.update({
            f"{name}.resolution": int(stage.resolution),
            f"{name}.steps": int(stage.steps),
            f"{name}.method.schedule.t_start": float(stage.t_start),
            f"{name}.method.schedule.t_end": float(stage.t_end),
            f"{name}.method.schedule.views_per_t": int(stage.views_per_t),
        })
    return out


def parse_value(text: str) -> Any:
    """A typed override value from text: true/false, null, an int, a float, or the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text.strip()


def parse_extra_overrides(text: str) -> dict[str, Any]:
    """``"prior.kind=reference; export.texture_size=1024"`` -> a dict; ValueError names a bad entry."""
    out: dict[str, Any] = {}
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"extra override {part.strip()!r} is not of the form key=value")
        out[key.strip()] = parse_value(value)
    return out


def preset_detail(preset: str, details: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """What the server said about a panel preset (capabilities' ``preset_details``); None from an older server."""
    return (details or {}).get(BACKEND_PRESETS.get(preset, ""))


def best_preset(details: Mapping[str, Any] | None) -> str | None:
    """The panel preset to start from on a server: Paper where it can run, Preview otherwise (None: the server does not say)."""
    if not details:
        return None
    paper = preset_detail("paper", details)
    return "paper" if paper is not None and paper.get("runnable") else "preview"


def not_runnable(preset: str, details: Mapping[str, Any] | None) -> str:
    """Why a panel preset cannot run on the server, with the fix; empty when it can (or the server does not say)."""
    detail = preset_detail(preset, details)
    if detail is None or detail.get("runnable", True):
        return ""
    fix = f" To fix: {detail['fix']}." if detail.get("fix") else ""
    return f"{PRESET_LABELS.get(preset, preset)} cannot run on this server: {detail.get('reason', 'the server says so')}.{fix}"


def prompt_reading(prompt: str, preset: str, details: Mapping[str, Any] | None,
                   extra_overrides: str = "") -> tuple[str, str]:
    """(the prompt the job will run, why the server will refuse it): the toy world's reading for its
    presets, else the prompt as written; the second is empty unless the prompt will be refused.

    Extra overrides of the prior (another model) leave the reading to the server.
    """
    detail = preset_detail(preset, details)
    words = detail.get("prompts") if detail is not None else None
    try:
        other_prior = any(k.startswith("prior.") for k in parse_extra_overrides(extra_overrides))
    except ValueError:
        other_prior = False  # reported when the job is sent
    if not words or not prompt.strip() or other_prior:
        return prompt.strip(), ""
    try:
        return read_toy_prompt(prompt, Vocabulary.from_fields(words)).prompt, ""
    except UnknownToyPrompt as exc:
        return prompt.strip(), str(exc)


def submit_arguments(prompt: str, negative_prompt: str, seed: int, method: str, preset: str,
                     stages: dict[str, StageSettings], extra_overrides: str = "",
                     details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Client.submit`` from the panel's values; ValueError if unusable.

    ``details`` (the server's ``preset_details``) refuses, before sending, a preset the server
    cannot run and a prompt its toy world would refuse.
    """
    if not prompt.strip():
        raise ValueError("write a prompt first")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    for problem in (not_runnable(preset, details), prompt_reading(prompt, preset, details, extra_overrides)[1]):
        if problem:
            raise ValueError(problem)
    overrides: dict[str, Any] = {}
    for name in STAGES:
        overrides.update(stage_overrides(name, stages.get(name, StageSettings())))
    overrides.update(parse_extra_overrides(extra_overrides))
    return {"prompt": prompt.strip(), "negative_prompt": negative_prompt.strip() or None, "seed": int(seed),
            "method": method, "preset": BACKEND_PRESETS[preset], "overrides": overrides}


def check_endpoint(endpoint: str) -> str:
    """The endpoint if it is a ZeroMQ tcp/ipc address, else ValueError saying what a good one looks like."""
    scheme, sep, rest = endpoint.strip().partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError(f"backend address {endpoint!r} should look like tcp://127.0.0.1:5555")
    if scheme == "tcp":
        parsed = urlparse(f"tcp://{rest}")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None:
            raise ValueError(f"backend address {endpoint!r} needs a host and a port, like tcp://127.0.0.1:5555")
    return endpoint.strip()


def format_eta(seconds: float | None) -> str:
    """``83.2`` -> ``"1m 23s"``; empty when unknown."""
    if seconds is None or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
