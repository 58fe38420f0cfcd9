"""Every message type, its fields and its arrays, checked on both encode and decode.

A schema is data: per type, which header slots it uses (job, seq), which fields it carries (type,
bounds, required or not) and which named arrays may follow it (dtype, shape pattern). The codec
validates every received message against it, so the server and the add-on only ever see
well-formed messages; anything else becomes a :class:`ProtocolError` that names the problem.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

#: Bumped on any incompatible change; a peer speaking another version is refused with an error.
PROTOCOL_VERSION = 1

METHODS: tuple[str, ...] = ("apfo", "vsd", "sds", "fsd")
START_STAGES: tuple[str, ...] = ("geometry", "texture", "refine")
#: Stage names the pipeline reports (progress/preview/mesh/stage_done); the schema only requires
#: the form STAGE_PATTERN, so a new stage needs no protocol change.
STAGES: tuple[str, ...] = ("stage1", "geometry", "texture", "refine", "export")
STAGE_PATTERN = re.compile(r"[a-z0-9_]{1,32}")
JOB_STATES: tuple[str, ...] = ("queued", "running", "cancelling", "done", "failed", "cancelled")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
#: Array dtypes allowed on the wire (little-endian, numpy names).
DTYPES: tuple[str, ...] = ("uint8", "uint16", "int32", "uint32", "int64", "float16", "float32", "float64")

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{8,64}")
#: Array names: a plain name, no folder, no leading dot (so never "." or "..").
BUFFER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Result file paths relative to the job's output folder: up to 4 such names joined by "/".
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}){0,3}")
OVERRIDE_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,7}")


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``str()`` says what is wrong, ``parent`` is its id if readable."""

    def __init__(self, message: str, parent: str | None = None, code: str = "bad_message") -> None:
        super().__init__(message)
        self.parent = parent
        self.code = code


# --------------------------------------------------------------------------------------------
# Field kinds. Each is a callable check(value, where) -> normalised value, raising ProtocolError.


@dataclass(frozen=True)
class Str:
    """A text field with a length bound and an optional pattern or choice list."""

    max_len: int = 256
    pattern: re.Pattern | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, where: str) -> str:
        """The value if it is a fitting string."""
        if not isinstance(value, str):
            raise ProtocolError(f"{where} must be a string, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{where} is {len(value)} characters long, over the limit of {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(f"{where} is {value!r}, not one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ProtocolError(f"{where} {_short(value)!r} is not in the expected form {self.pattern.pattern}")
        return value


@dataclass(frozen=True)
class Int:
    """An integer field within [lo, hi] (booleans are not integers here)."""

    lo: int = 0
    hi: int = 2**53

    def check(self, value: Any, where: str) -> int:
        """The value if it is an integer in range."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where} must be an integer, got {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{where} is {value}, outside [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Float:
    """A finite number within [lo, hi]; integers are accepted and become floats."""

    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, where: str) -> float:
        """The value as a float if it is a finite number in range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where} must be a number, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(f"{where} must be finite, got {value}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{where} is {value}, outside [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Bool:
    """A true/false field."""

    def check(self, value: Any, where: str) -> bool:
        """The value if it is a boolean."""
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false, got {_type_name(value)}")
        return value


@dataclass(frozen=True)
class Nullable:
    """``inner`` or None."""

    inner: Any

    def check(self, value: Any, where: str) -> Any:
        """None, or the inner kind's value."""
        return None if value is None else self.inner.check(value, where)


@dataclass(frozen=True)
class ListOf:
    """A list of at most ``max_len`` items of one kind."""

    item: Any
    max_len: int = 256

    def check(self, value: Any, where: str) -> list:
        """The list with each item checked."""
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where} must be a list, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{where} has {len(value)} items, over the limit of {self.max_len}")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf:
    """A map from checked string keys to values of one kind."""

    key: Str
    value: Any
    max_len: int = 256

    def check(self, value: Any, where: str) -> dict:
        """The map with each key and value checked."""
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be a map, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{where} has {len(value)} entries, over the limit of {self.max_len}")
        out = {}
        for k, v in value.items():
            k = self.key.check(k, f"a key of {where}")
            out[k] = self.value.check(v, f"{where}[{k!r}]")
        return out


@dataclass(frozen=True)
class Record:
    """A map with named fields, each (kind, required); other keys are errors."""

    fields: Mapping[str, tuple[Any, bool]]

    def check(self, value: Any, where: str) -> dict:
        """The map with each field checked."""
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be a map, got {_type_name(value)}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise ProtocolError(f"{where} has an unknown key {str(unknown[0])[:64]!r} (known: {', '.join(self.fields)})")
        out = {}
        for name, (kind, required) in self.fields.items():
            if name in value:
                out[name] = kind.check(value[name], f"{where}.{name}")
            elif required:
                raise ProtocolError(f"{where} lacks its {name!r}")
        return out


@dataclass(frozen=True)
class Scalar:
    """A string, finite number, boolean or None (override values)."""

    max_len: int = 1024

    def check(self, value: Any, where: str) -> Any:
        """The value if it is a bounded scalar."""
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return Int(-(2**63), 2**63 - 1).check(value, where)
        if isinstance(value, float):
            return Float().check(value, where)
        if isinstance(value, str):
            return Str(self.max_len).check(value, where)
        raise ProtocolError(f"{where} must be a string, number, boolean or null, got {_type_name(value)}")


@dataclass(frozen=True)
class OneOf:
    """The first of several kinds that accepts the value."""

    kinds: tuple
    description: str

    def check(self, value: Any, where: str) -> Any:
        """The value as the first fitting kind normalises it."""
        for kind in self.kinds:
            try:
                return kind.check(value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where} must be {self.description}, got {_type_name(value)}")


@dataclass(frozen=True)
class Plain:
    """Nested plain data (maps with string keys, lists, scalars), bounded in depth and size."""

    max_depth: int = 6
    max_items: int = 4096

    def check(self, value: Any, where: str) -> Any:
        """The value if it is plain data within the bounds."""
        budget = [self.max_items]
        self._walk(value, where, 0, budget)
        return value

    def _walk(self, value: Any, where: str, depth: int, budget: list[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ProtocolError(f"{where} holds more than {self.max_items} items")
        if depth > self.max_depth:
            raise ProtocolError(f"{where} is nested deeper than {self.max_depth} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ProtocolError(f"{where} has a key that is not a string ({_type_name(k)})")
                self._walk(v, f"{where}.{k}", depth + 1, budget)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self._walk(v, f"{where}[{i}]", depth + 1, budget)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ProtocolError(f"{where} must be finite, got {value}")
        elif not (value is None or isinstance(value, (str, int, bool))):
            raise ProtocolError(f"{where} holds a {_type_name(value)}, which is not plain data")


def _type_name(value: Any) -> str:
    return {dict: "a map", list: "a list", tuple: "a list", str: "a string", bytes: "binary data",
            bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


# --------------------------------------------------------------------------------------------
# Arrays.


@dataclass(frozen=True)
class ArraySpec:
    """Allowed dtypes and a shape pattern: an int is a fixed size, None any size, a tuple a choice."""

    dtypes: tuple[str, ...]
    shape: tuple

    def check(self, name: str, dtype: str, shape: tuple[int, ...], where: str) -> None:
        """Raise ProtocolError if dtype or shape do not fit."""
        if dtype not in self.dtypes:
            raise ProtocolError(f"{where}: array {name!r} must be {' or '.join(self.dtypes)}, got {dtype}")
        if len(shape) != len(self.shape):
            raise ProtocolError(f"{where}: array {name!r} must have {len(self.shape)} dimensions, got shape {list(shape)}")
        for size, want in zip(shape, self.shape):
            if want is None:
                continue
            if (isinstance(want, tuple) and size not in want) or (isinstance(want, int) and size != want):
                raise ProtocolError(f"{where}: array {name!r} has shape {list(shape)}, expected {_pattern(self.shape)}")


def _pattern(shape: tuple) -> str:
    return "(" + ", ".join("N" if s is None else "|".join(map(str, s)) if isinstance(s, tuple) else str(s) for s in shape) + ")"


MESH_ARRAYS: dict[str, ArraySpec] = {
    "vertices": ArraySpec(("float32",), (None, 3)),
    "faces": ArraySpec(("int32",), (None, 3)),
    "normals": ArraySpec(("float32",), (None, 3)),
    "uvs": ArraySpec(("float32",), (None, 2)),
    "texture": ArraySpec(("uint8",), (None, None, (3, 4))),
}
IMAGE_ARRAYS: dict[str, ArraySpec] = {"image": ArraySpec(("uint8",), (None, None, (3, 4)))}


def check_mesh_arrays(arrays: Mapping[str, Any], where: str, required: bool) -> None:
    """Cross-array checks of a mesh: both core arrays, matching rows, finite values, faces in range
    (meshcheck.check_mesh; a triangle that repeats a vertex is allowed on the wire)."""
    from .meshcheck import check_mesh

    present = [n for n in ("vertices", "faces") if n in arrays]
    if not present and not required and not (set(arrays) & set(MESH_ARRAYS)):
        return
    if len(present) != 2:
        missing = {"vertices", "faces"} - set(present)
        raise ProtocolError(f"{where}: a mesh needs both vertices and faces; missing {', '.join(sorted(missing))}")
    check_mesh(arrays["vertices"], arrays["faces"], arrays.get("normals"), arrays.get("uvs"),
               error=lambda message: ProtocolError(f"{where}: {message}"))


# --------------------------------------------------------------------------------------------
# Message types.


@dataclass(frozen=True)
class MessageSchema:
    """One message type: header slots, fields (name -> (kind, required)), arrays and extra checks."""

    job: str = "none"          # "none" | "optional" | "required"
    seq: str = "none"          # "none" | "optional" (job events carry one when they come from the log)
    fields: Mapping[str, tuple[Any, bool]] = field(default_factory=dict)
    arrays: Mapping[str, ArraySpec] = field(default_factory=dict)
    required_arrays: tuple[str, ...] = ()
    free_arrays: bool = False  # arrays with any checked name, raw bytes (result files)
    extra: Callable[[dict, dict, str], None] | None = None


def _req(kind: Any) -> tuple[Any, bool]:
    return (kind, True)


def _opt(kind: Any) -> tuple[Any, bool]:
    return (kind, False)


PROMPT = Str(4096)
STAGE = Str(32, pattern=STAGE_PATTERN)
OBJECT_ID = Nullable(Str(256))
OVERRIDES = MapOf(Str(128, pattern=OVERRIDE_KEY_PATTERN),
                  OneOf((Scalar(), ListOf(Scalar(), 16)), "a scalar or a list of up to 16 scalars"), 256)
JOB_SUMMARY = Plain(max_depth=4, max_items=512)


#: The toy world's words (dreamflow_protocol.prompts.Vocabulary.as_fields).
VOCABULARY = Record({"shapes": (ListOf(Str(64), 64), True), "colours": (ListOf(Str(64), 64), True),
                     "synonyms": (MapOf(Str(64), Str(64), 256), False)})
#: Whether a preset can run on this server, why not, the fix, and (a preset whose prior is the
#: toy world's) the only words its prompts may use.
PRESET_DETAIL = Record({"runnable": (Bool(), True), "reason": (Str(1024), False), "fix": (Str(1024), False),
                        "prompts": (VOCABULARY, False)})
#: Optional capabilities fields added after protocol package 0.1.0, whose clients refuse unknown
#: fields: a server sends each only to clients whose hello names that client_version or a later one.
NEWER_CAPABILITIES: dict[str, tuple[int, ...]] = {"preset_details": (0, 2, 0)}


def version_tuple(text: str | None) -> tuple[int, ...]:
    """``"0.2.0"`` -> (0, 2, 0); () when ``text`` does not start with a number (an unknown or old client)."""
    match = re.match(r"\d+(\.\d+)*", text or "")
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def capabilities_for(fields: Mapping[str, Any], client_version: str | None) -> dict[str, Any]:
    """The capabilities fields a client of ``client_version`` can decode (newer optional ones left out)."""
    have = version_tuple(client_version)
    return {k: v for k, v in fields.items() if k not in NEWER_CAPABILITIES or have >= NEWER_CAPABILITIES[k]}


def _submit_extra(fields: dict, arrays: dict, where: str) -> None:
    check_mesh_arrays(arrays, where, required=False)
    if ("start_stage" in fields or "start_t" in fields) and "vertices" not in arrays:
        raise ProtocolError(f"{where}: start_stage/start_t need an input mesh (vertices and faces arrays)")


def _mesh_extra(fields: dict, arrays: dict, where: str) -> None:
    check_mesh_arrays(arrays, where, required=True)


SCHEMAS: dict[str, MessageSchema] = {
    # Client -> server: opening handshake; the server answers with capabilities.
    "hello": MessageSchema(fields={"client": _opt(Str(128)), "client_version": _opt(Str(64))}),
    "capabilities": MessageSchema(fields={
        "protocol": _req(Int(0, 2**16)), "server_version": _req(Str(64)), "server_id": _req(Str(64)),
        "device": _req(Str(256)), "accelerators": _req(MapOf(Str(64), Bool(), 64)),
        "presets": _req(ListOf(Str(64), 64)), "methods": _req(ListOf(Str(16), 16)),
        "start_stages": _req(ListOf(Str(16), 16)), "limits": _req(MapOf(Str(64), Int(0, 2**62), 64)),
        "max_queue": _req(Int(0, 10**6)), "auth": _req(Str(16, choices=("none", "curve"))),
        "preset_details": _opt(MapOf(Str(64), PRESET_DETAIL, 64))}),
    # Client -> server: a new job; input mesh arrays are optional (refine an artist's edit).
    "submit": MessageSchema(
        fields={"prompt": _req(PROMPT), "negative_prompt": _opt(PROMPT), "seed": _opt(Int(0, 2**32 - 1)),
                "method": _opt(Str(16, choices=METHODS)), "preset": _opt(Str(64, pattern=re.compile(r"[a-z0-9_-]{1,64}"))),
                "overrides": _opt(OVERRIDES), "start_stage": _opt(Str(16, choices=START_STAGES)),
                "start_t": _opt(Float(0.0, 1.0)), "object_id": _opt(OBJECT_ID), "subscribe": _opt(Bool())},
        arrays=MESH_ARRAYS, extra=_submit_extra),
    # Server -> client, answers submit: the job id is in the header's job slot.
    "accepted": MessageSchema(job="required", fields={"position": _req(Int(0, 10**6)), "state": _req(Str(16, choices=JOB_STATES))}),
    "progress": MessageSchema(job="required", seq="optional", fields={
        "stage": _req(STAGE), "step": _req(Int(0, 10**9)), "total": _req(Int(0, 10**9)),
        "loss": _opt(Nullable(Float())), "grad_norm": _opt(Nullable(Float(0.0))),
        "eta": _opt(Nullable(Float(0.0))), "elapsed": _opt(Float(0.0)),
        "t": _opt(Nullable(Float())), "stage_index": _opt(Int(0, 16)), "stage_count": _opt(Int(0, 16))}),
    "preview": MessageSchema(job="required", seq="optional", fields={"stage": _req(STAGE), "step": _req(Int(0, 10**9))},
                             arrays=IMAGE_ARRAYS, required_arrays=("image",)),
    "mesh": MessageSchema(job="required", seq="optional",
                          fields={"stage": _req(STAGE), "step": _req(Int(0, 10**9)), "final": _req(Bool()), "object_id": _opt(OBJECT_ID)},
                          arrays=MESH_ARRAYS, required_arrays=("vertices", "faces"), extra=_mesh_extra),
    "stage_done": MessageSchema(job="required", seq="optional", fields={
        "stage": _req(STAGE), "steps": _opt(Int(0, 10**9)), "seconds": _opt(Float(0.0)), "report": _opt(Plain())}),
    "job_done": MessageSchema(job="required", seq="optional", fields={
        "files": _req(ListOf(Str(256, pattern=FILE_NAME_PATTERN), 64)), "seconds": _opt(Float(0.0)), "report": _opt(Plain())}),
    # Either the answer to a bad request (parent set) or a job's terminal failure (job and seq set).
    "error": MessageSchema(job="optional", seq="optional", fields={
        "message": _req(Str(4096)), "code": _req(Str(32, pattern=re.compile(r"[a-z_]{1,32}"))), "field": _opt(Str(128))}),
    "cancel": MessageSchema(job="required", fields={"reason": _opt(Str(256))}),
    "cancelled": MessageSchema(job="required", seq="optional", fields={"reason": _req(Str(256))}),
    # status with a job: that job's summary; without: the server's summary.
    "status": MessageSchema(job="optional"),
    "status_reply": MessageSchema(job="optional", fields={"job_status": _opt(JOB_SUMMARY), "server": _opt(JOB_SUMMARY)}),
    "list_jobs": MessageSchema(fields={"limit": _opt(Int(1, 200)), "state": _opt(Str(16, choices=JOB_STATES))}),
    "jobs": MessageSchema(fields={"jobs": _req(ListOf(JOB_SUMMARY, 1000))}),
    # Replay the job's events from sequence number from_seq, then stream it live.
    "subscribe": MessageSchema(job="required", fields={"from_seq": _opt(Int(0, 2**53))}),
    "subscribed": MessageSchema(job="required", fields={
        "from_seq": _req(Int(0, 2**53)), "next_seq": _req(Int(0, 2**53)), "state": _req(Str(16, choices=JOB_STATES))}),
    "unsubscribe": MessageSchema(job="required"),
    "fetch": MessageSchema(job="required", fields={"names": _opt(ListOf(Str(256, pattern=FILE_NAME_PATTERN), 64))}),
    # Result files as uint8 arrays named by file name.
    "result": MessageSchema(job="required", fields={"files": _req(ListOf(Str(256, pattern=FILE_NAME_PATTERN), 64))},
                            free_arrays=True),
    "ping": MessageSchema(fields={"t": _opt(Float())}),
    "pong": MessageSchema(fields={"t": _opt(Float()), "server_time": _req(Float()), "server_id": _req(Str(64))}),
    "busy": MessageSchema(fields={"message": _req(Str(1024)), "queued": _req(Int(0, 10**6)), "max_queue": _req(Int(0, 10**6))}),
    "log": MessageSchema(job="optional", seq="optional", fields={
        "level": _req(Str(16, choices=LOG_LEVELS)), "message": _req(Str(4096)), "stage": _opt(STAGE)}),
}

#: Types that belong to a job's event stream (stored with a seq, replayed by subscribe).
EVENT_TYPES: frozenset[str] = frozenset({"progress", "preview", "mesh", "stage_done", "job_done", "error", "cancelled", "log"})
#: Event types after which a job produces nothing more.
TERMINAL_TYPES: frozenset[str] = frozenset({"job_done", "cancelled", "error"})
#: Requests a client sends; the rest are what a server sends.
REQUEST_TYPES: frozenset[str] = frozenset({"hello", "submit", "cancel", "status", "list_jobs", "subscribe", "unsubscribe", "fetch", "ping"})


def check_fields(mtype: str, fields: Any, where: str) -> dict:
    """Validate a message's fields against its schema; the normalised fields or ProtocolError."""
    schema = SCHEMAS[mtype]
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: fields must be a map, got {_type_name(fields)}")
    unknown = [k for k in fields if k not in schema.fields]
    if unknown:
        known = ", ".join(schema.fields) or "none"
        raise ProtocolError(f"{where}: unknown field {str(unknown[0])[:64]!r} (known: {known})", code="bad_field")
    out = {}
    for name, (kind, required) in schema.fields.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{where}: missing required field {name!r}", code="bad_field")
            continue
        try:
            out[name] = kind.check(fields[name], f"{where}: field {name!r}")
        except ProtocolError as exc:
            exc.code = "bad_field"
            raise
    return out
