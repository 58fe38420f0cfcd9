"""Messages to ZeroMQ frames and back: a msgpack header frame, then one raw frame per array.

Arrays are never copied by this module: encoding hands the array's own memory to ZeroMQ (send
with ``copy=False``), decoding wraps the received frame's buffer with ``np.frombuffer`` (the
decoded array is read-only and keeps the frame alive). Nothing is ever pickled.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

from .schema import (BUFFER_NAME_PATTERN, DTYPES, EVENT_TYPES, FILE_NAME_PATTERN, ID_PATTERN, JOB_ID_PATTERN, PROTOCOL_VERSION, SCHEMAS,
                     ProtocolError, check_fields)

HEADER_KEYS = ("v", "type", "id", "job", "seq", "parent", "fields", "buffers")


@dataclass(frozen=True)
class Limits:
    """Size bounds a peer enforces on what it receives (and checks on what it sends)."""

    max_header_bytes: int = 256 * 1024
    max_frame_bytes: int = 512 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024 * 1024
    max_buffers: int = 64
    max_str_len: int = 64 * 1024
    max_list_len: int = 4096
    max_map_len: int = 1024
    max_depth: int = 8
    max_dims: int = 4

    def as_dict(self) -> dict[str, int]:
        """The limits by name (the capabilities message)."""
        return {k: int(getattr(self, k)) for k in self.__dataclass_fields__}


DEFAULT_LIMITS = Limits()


def new_id() -> str:
    """A fresh message or job id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


@dataclass
class Message:
    """One protocol message: header slots, checked fields, and named numpy arrays."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    job: str | None = None
    seq: int | None = None
    parent: str | None = None
    id: str = field(default_factory=new_id)

    def reply(self, mtype: str, fields: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
              job: str | None = None) -> "Message":
        """A message answering this one (its ``parent`` is this message's id)."""
        return Message(mtype, dict(fields or {}), dict(arrays or {}), job=job if job is not None else self.job, parent=self.id)


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name} is not allowed on the wire (allowed: {', '.join(DTYPES)})")
    return name


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS, validate: bool = True) -> list[Any]:
    """Frames for ``socket.send_multipart(frames, copy=False)``: header bytes, then each array's memory.

    Arrays that are already C-contiguous little-endian go out as they are (no copy); others are
    made so first (one copy, only then). ``validate`` checks the message like a receiver would.
    """
    if validate:
        validate_message(msg, limits)
    buffers, frames = [], []
    for name, arr in msg.arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        buffers.append({"name": name, "dtype": _dtype_name(arr.dtype), "shape": list(arr.shape)})
        # A 0-d or empty array has no buffer to share; a memoryview of its (empty) bytes is enough.
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    header = {"v": PROTOCOL_VERSION, "type": msg.type, "id": msg.id, "job": msg.job, "seq": msg.seq,
              "parent": msg.parent, "fields": msg.fields, "buffers": buffers}
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"{msg.type} header is {len(head)} bytes, over the limit of {limits.max_header_bytes}")
    return [head, *frames]


def validate_message(msg: Message, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check an outgoing message against its schema; return it with normalised fields."""
    where = msg.type
    schema = SCHEMAS.get(msg.type)
    if schema is None:
        raise ProtocolError(f"unknown message type {msg.type!r}", code="unknown_type")
    _check_slots(msg.type, schema, msg.job, msg.seq, msg.parent)
    msg.fields = check_fields(msg.type, msg.fields, where)
    _check_arrays(msg.type, schema, {n: (np.asarray(a).dtype.name, tuple(np.asarray(a).shape)) for n, a in msg.arrays.items()},
                  limits)
    if schema.extra is not None:
        schema.extra(msg.fields, msg.arrays, where)
    return msg


def _check_slots(mtype: str, schema: Any, job: Any, seq: Any, parent: Any) -> None:
    if job is None:
        if schema.job == "required":
            raise ProtocolError(f"{mtype}: needs a job id", code="bad_header")
    else:
        if schema.job == "none":
            raise ProtocolError(f"{mtype}: takes no job id", code="bad_header")
        if not isinstance(job, str) or not JOB_ID_PATTERN.fullmatch(job):
            raise ProtocolError(f"{mtype}: job id must be 8-64 lowercase hex digits, got {_brief(job)}", code="bad_header")
    if seq is not None:
        if schema.seq == "none":
            raise ProtocolError(f"{mtype}: takes no sequence number", code="bad_header")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**53:
            raise ProtocolError(f"{mtype}: seq must be an integer in [0, 2^53), got {_brief(seq)}", code="bad_header")
        if job is None:
            raise ProtocolError(f"{mtype}: a sequence number needs a job id", code="bad_header")
    if parent is not None and (not isinstance(parent, str) or not ID_PATTERN.fullmatch(parent)):
        raise ProtocolError(f"{mtype}: parent must be a 32-digit hex message id, got {_brief(parent)}", code="bad_header")


def _check_arrays(mtype: str, schema: Any, described: dict[str, tuple[str, tuple[int, ...]]], limits: Limits) -> None:
    if len(described) > limits.max_buffers:
        raise ProtocolError(f"{mtype}: {len(described)} arrays, over the limit of {limits.max_buffers}", code="bad_buffers")
    for name, (dtype, shape) in described.items():
        if schema.free_arrays:
            if dtype != "uint8" or len(shape) != 1:
                raise ProtocolError(f"{mtype}: array {name!r} must be a 1-d uint8 byte array, got {dtype} {list(shape)}",
                                    code="bad_buffers")
            if not FILE_NAME_PATTERN.fullmatch(name):
                raise ProtocolError(f"{mtype}: array name {_brief(name)} is not a plain relative file path", code="bad_buffers")
            continue
        spec = schema.arrays.get(name)
        if spec is None:
            allowed = ", ".join(schema.arrays) or "none"
            raise ProtocolError(f"{mtype}: unexpected array {_brief(name)} (allowed: {allowed})", code="bad_buffers")
        try:
            spec.check(name, dtype, shape, mtype)
        except ProtocolError as exc:
            exc.code = "bad_buffers"
            raise
    missing = [n for n in schema.required_arrays if n not in described]
    if missing:
        raise ProtocolError(f"{mtype}: missing required array {missing[0]!r}", code="bad_buffers")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:48] + "..."


def _as_buffer(frame: Any) -> memoryview:
    """The frame's memory without copying: zmq.Frame.buffer, or the bytes-like object itself."""
    buf = getattr(frame, "buffer", frame)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _unpack_header(raw: memoryview, limits: Limits) -> Any:
    # The frame's length is already bounded by max_header_bytes (unpackb's max_buffer_size);
    # these bound what a small header could still declare.
    try:
        return msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=limits.max_str_len, max_bin_len=0, max_array_len=limits.max_list_len,
                               max_map_len=limits.max_map_len, max_ext_len=0)
    except msgpack.exceptions.ExtraData:
        raise ProtocolError("header frame has bytes after its msgpack map", code="bad_header") from None
    except (ValueError, TypeError, msgpack.exceptions.UnpackException, RecursionError) as exc:
        text = str(exc) or type(exc).__name__
        raise ProtocolError(f"header frame is not valid msgpack within the limits ({text[:200]})", code="bad_header") from None


def _depth(value: Any, limit: int, level: int = 0) -> None:
    if level > limit:
        raise ProtocolError(f"header is nested deeper than {limit} levels", code="bad_header")
    if isinstance(value, dict):
        for v in value.values():
            _depth(v, limit, level + 1)
    elif isinstance(value, list):
        for v in value:
            _depth(v, limit, level + 1)


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS, contents: bool = True) -> Message:
    """Parse and validate one received message (without the ROUTER identity frame).

    Raises ProtocolError naming the first problem; its ``parent`` is the message's id when the
    header was readable, so the sender can match the error to its request. ``contents=False``
    leaves out the checks that read every array element (a mesh's NaN and face-index checks), for
    a receiver that runs :func:`check_contents` later on another thread.
    """
    if len(frames) == 0:
        raise ProtocolError("empty message (no header frame)", code="bad_header")
    head = _as_buffer(frames[0])
    if head.nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header frame is {head.nbytes} bytes, over the limit of {limits.max_header_bytes}",
                            code="too_large")
    header = _unpack_header(head, limits)
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}", code="bad_header")
    mid = header.get("id")
    parent = mid if isinstance(mid, str) and ID_PATTERN.fullmatch(mid) else None
    try:
        return _decode_checked(header, frames, limits, parent, contents)
    except ProtocolError as exc:
        exc.parent = parent
        raise


def _decode_checked(header: dict, frames: Sequence[Any], limits: Limits, mid: str | None, contents: bool) -> Message:
    _depth(header, limits.max_depth)
    unknown = [k for k in header if k not in HEADER_KEYS]
    if unknown:
        raise ProtocolError(f"header has unknown key {_brief(unknown[0])}", code="bad_header")
    missing = [k for k in ("v", "type", "id") if k not in header]
    if missing:
        raise ProtocolError(f"header is missing {missing[0]!r}", code="bad_header")
    version = header["v"]
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"protocol version {_brief(version)} is not supported (this side speaks version {PROTOCOL_VERSION})",
                            code="bad_version")
    mtype = header["type"]
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {_brief(mtype)}", code="unknown_type")
    if mid is None:
        raise ProtocolError(f"{mtype}: message id must be 32 lowercase hex digits, got {_brief(header['id'])}", code="bad_header")
    schema = SCHEMAS[mtype]
    job, seq, parent = header.get("job"), header.get("seq"), header.get("parent")
    _check_slots(mtype, schema, job, seq, parent)
    fields = check_fields(mtype, header.get("fields", {}), mtype)

    descs = header.get("buffers", [])
    if not isinstance(descs, list):
        raise ProtocolError(f"{mtype}: buffers must be a list, got {type(descs).__name__}", code="bad_buffers")
    if len(descs) > limits.max_buffers:
        raise ProtocolError(f"{mtype}: {len(descs)} buffers, over the limit of {limits.max_buffers}", code="bad_buffers")
    if len(descs) != len(frames) - 1:
        raise ProtocolError(f"{mtype}: header describes {len(descs)} buffers but {len(frames) - 1} data frames followed",
                            code="bad_buffers")
    parsed: list[tuple[str, str, tuple[int, ...], memoryview]] = []
    total = _as_buffer(frames[0]).nbytes
    for i, desc in enumerate(descs):
        name, dtype, shape = _check_desc(mtype, i, desc, limits)
        buf = _as_buffer(frames[i + 1])
        nbytes = buf.nbytes
        if nbytes > limits.max_frame_bytes:
            raise ProtocolError(f"{mtype}: frame {i + 1} ({name!r}) is {nbytes} bytes, over the limit of {limits.max_frame_bytes}",
                                code="too_large")
        total += nbytes
        if total > limits.max_message_bytes:
            raise ProtocolError(f"{mtype}: message is over the limit of {limits.max_message_bytes} bytes", code="too_large")
        want = math.prod(shape) * np.dtype(dtype).itemsize
        if want != nbytes:
            raise ProtocolError(f"{mtype}: array {name!r} is {dtype} {list(shape)} = {want} bytes, but its frame holds {nbytes}",
                                code="bad_buffers")
        parsed.append((name, dtype, shape, buf))
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise ProtocolError(f"{mtype}: two buffers share a name", code="bad_buffers")
    _check_arrays(mtype, schema, {n: (d, s) for n, d, s, _ in parsed}, limits)
    # The zero-copy step: the array views the frame's own memory (little-endian on the wire).
    arrays = {}
    for name, dtype, shape, buf in parsed:
        arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        arr.flags.writeable = False  # it shares the frame's memory: copy it before changing it
        arrays[name] = arr
    msg = Message(mtype, fields, arrays, job=job, seq=seq, parent=parent, id=mid)
    if contents:
        check_contents(msg)
    return msg


def check_contents(msg: Message) -> None:
    """The checks of a message that read its arrays' contents (decode runs them unless told not to)."""
    extra = SCHEMAS[msg.type].extra
    if extra is not None:
        try:
            extra(msg.fields, msg.arrays, msg.type)
        except ProtocolError as exc:
            exc.parent = msg.id
            raise


def _check_desc(mtype: str, i: int, desc: Any, limits: Limits) -> tuple[str, str, tuple[int, ...]]:
    where = f"{mtype}: buffer {i}"
    if not isinstance(desc, dict) or set(desc) != {"name", "dtype", "shape"}:
        raise ProtocolError(f"{where} must be a map with exactly name, dtype and shape", code="bad_buffers")
    name, dtype, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or not (BUFFER_NAME_PATTERN.fullmatch(name) or FILE_NAME_PATTERN.fullmatch(name)):
        raise ProtocolError(f"{where} has an invalid name {_brief(name)}", code="bad_buffers")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"{where} ({name!r}) has dtype {_brief(dtype)}, not one of {', '.join(DTYPES)}", code="bad_dtype")
    if not isinstance(shape, list) or len(shape) > limits.max_dims:
        raise ProtocolError(f"{where} ({name!r}) shape must be a list of at most {limits.max_dims} sizes", code="bad_buffers")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= limits.max_frame_bytes:
            raise ProtocolError(f"{where} ({name!r}) has an invalid size {_brief(s)} in its shape", code="bad_buffers")
    return name, dtype, tuple(shape)


def is_event(msg: Message) -> bool:
    """True when the message belongs to a job's stored event stream."""
    return msg.type in EVENT_TYPES and msg.job is not None and msg.seq is not None
