"""Property-based fuzzing of the protocol decoder: whatever arrives, ``decode`` returns a message
that passes its own schema or raises ProtocolError naming the problem; never anything else, and
never an allocation the frames do not already hold.

Case counts (derandomised, so every CI run tries the same inputs): see ``CASES`` below; together
more than 10,000 inputs per run of the suite.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Callable

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_helpers import JOB, SAMPLE_FRAMES, cube_arrays, fuzz, header, mutated_frames, pack

from dreamflow_protocol import DEFAULT_LIMITS, PROTOCOL_VERSION, SCHEMAS, Message, ProtocolError, decode, encode, validate_message
from dreamflow_protocol.schema import DTYPES

#: Examples per property; the sum is the suite's decoder-level fuzz count.
CASES = {"random": 3500, "mutated": 5000, "structured": 1000, "buffers": 500, "version": 150, "unknown_field": 150,
         "nan_mesh": 150, "job_id": 150}
ERROR_CODES = {"bad_header", "bad_version", "unknown_type", "bad_field", "bad_buffers", "bad_dtype", "too_large", "bad_message"}


def fuzz_test(kind: str, *strategies: st.SearchStrategy, at_least: int | None = None) -> Callable:
    """A test running ``body`` on CASES[kind] generated inputs; it also checks that many really ran."""

    def wrap(body: Callable) -> Callable:
        def test() -> None:
            ran = [0]

            @fuzz(CASES[kind])
            @given(st.tuples(*strategies))
            def prop(args: tuple) -> None:
                ran[0] += 1
                body(*args)

            prop()
            print(f"{kind}: {ran[0]} cases")
            assert ran[0] >= (CASES[kind] if at_least is None else at_least), f"only {ran[0]} {kind} cases ran"

        test.__name__, test.__doc__ = body.__name__, body.__doc__
        return test

    return wrap


def decode_or_error(frames: list[bytes]) -> Message | ProtocolError:
    """decode's outcome; any exception but ProtocolError fails the test."""
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        text = str(exc)
        assert text and len(text) < 4096 and exc.code in ERROR_CODES, (exc.code, text)
        return exc
    # Accepted: it must satisfy its own schema and survive a round trip unchanged.
    validate_message(Message(msg.type, dict(msg.fields), dict(msg.arrays), job=msg.job, seq=msg.seq, parent=msg.parent,
                             id=msg.id))
    again = decode([bytes(f) for f in encode(msg)])
    assert (again.type, again.fields, again.job, again.seq, again.parent) == (msg.type, msg.fields, msg.job, msg.seq, msg.parent)
    for name, arr in msg.arrays.items():
        assert not arr.flags.writeable and np.array_equal(again.arrays[name], arr)
    return msg


@fuzz_test("random", st.lists(st.binary(max_size=300), max_size=5))
def test_random_frames_never_escape_as_anything_but_protocol_errors(frames):
    decode_or_error(frames)


@fuzz_test("mutated", mutated_frames())
def test_mutated_valid_messages_decode_or_fail_with_a_named_error(frames):
    decode_or_error(frames)


# Header values of every msgpack kind, nested (deep nesting included: beyond max_depth it must be refused).
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**64 + 1, 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=20), st.binary(max_size=20))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=6)
FIELD_NAMES = sorted({name for schema in SCHEMAS.values() for name in schema.fields} | {"x", "", "../x"})


@st.composite
def structured_headers(draw: st.DrawFn) -> list[bytes]:
    h = header(type=draw(st.one_of(st.sampled_from(sorted(SCHEMAS)), st.text(max_size=12))))
    for key, strategy in (("v", st.one_of(st.just(PROTOCOL_VERSION), VALUES)),
                          ("id", st.one_of(st.just(h["id"]), st.text(alphabet="0123456789abcdefABCDEF./", max_size=40), VALUES)),
                          ("job", st.one_of(st.none(), st.just(JOB),
                                            st.sampled_from(["../../etc/passwd", "ab" * 40, "/tmp", "."]), VALUES)),
                          ("seq", st.one_of(st.none(), st.integers(-5, 2**60), VALUES)),
                          ("parent", st.one_of(st.none(), st.just(h["id"]), VALUES)),
                          ("fields", st.one_of(st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=3), VALUES))):
        if draw(st.booleans()):
            h[key] = draw(strategy)
    if draw(st.integers(0, 9)) == 0:
        del h[draw(st.sampled_from(sorted(h)))]
    if draw(st.integers(0, 9)) == 0:
        h[draw(st.text(min_size=1, max_size=6))] = draw(VALUES)
    try:
        head = msgpack.packb(h, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        head = msgpack.packb(header(), use_bin_type=True)
    return [head, *draw(st.lists(st.binary(max_size=48), max_size=2))]


@fuzz_test("structured", structured_headers())
def test_headers_with_wrong_types_and_values_are_refused_by_name(frames):
    decode_or_error(frames)


BAD_DTYPES = ["complex64", "object", "<f4", "V8", "S3", ""]


@st.composite
def buffer_declarations(draw: st.DrawFn) -> tuple[list[bytes], dict]:
    """A submit whose array descriptions lie: wrong dtypes, shapes, huge sizes, frames of the wrong length."""
    descs, frames = [], []
    for _ in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**62), st.sampled_from([-1, 2**31, 2**64 - 1])),
                             max_size=6))
        desc = {"name": draw(st.sampled_from(["vertices", "faces", "normals", "uvs", "texture", "image", "../x", "", "a" * 200])),
                "dtype": draw(st.one_of(st.sampled_from(DTYPES), st.sampled_from(BAD_DTYPES))),
                "shape": dims}
        if draw(st.integers(0, 9)) == 0:
            desc[draw(st.sampled_from(["offset", "strides", "name"]))] = draw(VALUES)
        descs.append(desc)
        frames.append(draw(st.binary(max_size=96)))
    h = header(type="submit", fields={"prompt": "p"}, buffers=descs)
    try:
        head = msgpack.packb(h, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        head = msgpack.packb(header(), use_bin_type=True)
    return [head, *frames], h


@fuzz_test("buffers", buffer_declarations())
def test_array_declarations_are_checked_against_their_frames(case):
    frames, h = case
    outcome = decode_or_error(frames)
    if isinstance(outcome, Message):
        for name, arr in outcome.arrays.items():
            # Every accepted array is exactly its declared dtype and shape, viewing its own frame.
            desc = next(d for d in h["buffers"] if d["name"] == name)
            assert arr.dtype.name == desc["dtype"] and list(arr.shape) == desc["shape"]


OTHER_VERSIONS = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=5), st.none(),
                           st.booleans()).filter(lambda v: v != PROTOCOL_VERSION or isinstance(v, bool))


@fuzz_test("version", OTHER_VERSIONS, at_least=100)
def test_every_other_protocol_version_is_refused_by_name(version):
    h = header(v=version)
    exc = decode_or_error([pack(h)])
    assert isinstance(exc, ProtocolError) and "protocol version" in str(exc) and exc.parent == h["id"]


@fuzz_test("unknown_field", st.sampled_from(sorted(SCHEMAS)), st.text(min_size=1, max_size=20), at_least=100)
def test_unknown_fields_are_named_in_the_error(mtype, name):
    if name in SCHEMAS[mtype].fields:
        return
    h = header(type=mtype, fields={name: 1})
    h["job"] = JOB if SCHEMAS[mtype].job == "required" else None
    exc = decode_or_error([pack(h)])
    assert isinstance(exc, ProtocolError) and f"unknown field {name[:64]!r}" in str(exc), str(exc)


@fuzz_test("nan_mesh", st.sampled_from(["vertices", "normals", "uvs"]), st.sampled_from([math.nan, math.inf, -math.inf]),
           st.integers(0, 7), st.integers(0, 2), at_least=100)
def test_a_submitted_mesh_with_nan_or_inf_is_refused_naming_the_array(name, bad, row, col):
    arrays = cube_arrays()
    arr = arrays[name].copy()
    arr[row, col % arr.shape[1]] = bad
    arrays[name] = arr
    frames = [bytes(f) for f in encode(Message("submit", {"prompt": "p"}, arrays), validate=False)]
    exc = decode_or_error(frames)
    assert isinstance(exc, ProtocolError) and name in str(exc) and "NaN or infinite" in str(exc), str(exc)


TRAVERSALS = ["../../etc", "..", "/etc/passwd", "ab" * 16 + "/..", "AB" * 16, "ab" * 33, "ab" * 16 + "\x00"]


@fuzz_test("job_id", st.one_of(st.text(max_size=70), st.sampled_from(TRAVERSALS)), at_least=100)
def test_job_ids_that_could_name_a_path_are_refused(job):
    h = header(type="status", job=job)
    outcome = decode_or_error([pack(h)])
    if isinstance(outcome, Message):
        assert all(c in "0123456789abcdef" for c in outcome.job) and 8 <= len(outcome.job) <= 64
    else:
        assert "job id must be" in str(outcome)


@pytest.mark.parametrize("depth", [9, 100, 1000, 100_000])
def test_deep_nesting_is_refused_without_recursion_errors(depth):
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]], packed by hand: msgpack would refuse to pack it
    with pytest.raises(ProtocolError) as info:
        decode([_with_fields(header(), b"\x81\xa1t" + nested)])  # fields = {"t": nested}
    assert "nested deeper than 8 levels" in str(info.value) or "not valid msgpack" in str(info.value)
    assert decode([_with_fields(header(), b"\x81\xa1t\xcb" + np.float64(1.0).byteswap().tobytes())]).fields == {"t": 1.0}


def _with_fields(h: dict, packed_value: bytes) -> bytes:
    """A header map whose "fields" entry is the already-packed ``packed_value``."""
    rest = {k: v for k, v in h.items() if k != "fields"}  # 7 entries: a fixmap, so its first byte is 0x87
    body = pack(rest)
    assert body[0] & 0xF0 == 0x80  # a fixmap of under 16 entries
    return bytes([body[0] + 1]) + body[1:] + pack("fields") + packed_value


@pytest.mark.parametrize("declared", [
    b"\xdd\xff\xff\xff\xff",          # array32 of 4 billion items, no body
    b"\xdf\xff\xff\xff\xff",          # map32 of 4 billion entries
    b"\xdb\xff\xff\xff\xff",          # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",          # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",      # ext32 of 4 GiB
])
def test_huge_declared_sizes_allocate_nothing(declared):
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode([declared])
        with pytest.raises(ProtocolError):
            decode([_with_fields(header(), declared)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"decoding a 5-byte lie allocated {peak} bytes"


def test_an_array_shape_that_overflows_is_refused_without_allocating():
    h = header(type="submit", fields={"prompt": "p"},
               buffers=[{"name": "vertices", "dtype": "float64", "shape": [2**29, 2**29, 2**29, 3]},
                        {"name": "faces", "dtype": "int32", "shape": [1, 3]}])
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="bytes, but its frame holds 12"):
            decode([pack(h), b"\0" * 12, b"\0" * 12])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_more_buffers_than_the_limit_are_refused_before_any_is_read():
    many = header(buffers=[{"name": f"b{i}", "dtype": "uint8", "shape": [0]} for i in range(DEFAULT_LIMITS.max_buffers + 1)])
    limit = DEFAULT_LIMITS.max_buffers
    with pytest.raises(ProtocolError, match=f"{limit + 1} buffers, over the limit of {limit}"):
        decode([pack(many), *[b""] * (DEFAULT_LIMITS.max_buffers + 1)])


def test_the_mutation_seeds_are_valid_messages_of_every_type():
    decoded = [decode(frames) for frames in SAMPLE_FRAMES]
    assert {m.type for m in decoded} == set(SCHEMAS)
