"""The panel's settings as a protocol job spec; pure Python (no ``bpy``), so it is testable anywhere.

The backend's typed configuration (``dreamflow.pipeline.config.JobConfig``) is overridden by
dotted paths; this module names those paths once. A stage the artist did not customise sends only
its ``enabled`` flag, so the chosen preset's values apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

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


def submit_arguments(prompt: str, negative_prompt: str, seed: int, method: str, preset: str,
                     stages: dict[str, StageSettings], extra_overrides: str = "") -> dict[str, Any]:
    """Keyword arguments for ``Client.submit`` from the panel's values; ValueError if unusable."""
    if not prompt.strip():
        raise ValueError("write a prompt first")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    overrides: dict[str, Any] = {}
    for name in STAGES:
        overrides.update(stage_overrides(name, stages.get(name, StageSettings())))
    overrides.update(parse_extra_overrides(extra_overrides))
    return {"prompt": prompt.strip(), "negative_prompt": negative_prompt.strip() or None, "seed": int(seed),
            "method": method, "preset": BACKEND_PRESETS[preset], "overrides": overrides}


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_local_endpoint(endpoint: str) -> bool:
    """True for loopback TCP addresses and ipc/inproc endpoints (no network access needed)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlparse(f"tcp://{rest}").hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


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
