"""Codec round trips, zero-copy decoding and the errors bad messages get (no sockets)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from dreamflow_protocol import PROTOCOL_VERSION, SCHEMAS, Limits, Message, ProtocolError, decode, encode, new_id


def _mesh(n_faces: int = 8, texture: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = n_faces + 2
    arrays = {
        "vertices": rng.normal(size=(n, 3)).astype(np.float32),
        "faces": rng.integers(0, n, size=(n_faces, 3)).astype(np.int32),
        "normals": rng.normal(size=(n, 3)).astype(np.float32),
        "uvs": rng.random((n, 2)).astype(np.float32),
    }
    if texture:
        arrays["texture"] = rng.integers(0, 255, size=(16, 8, 3)).astype(np.uint8)
    return arrays


def _as_frames(frames: list) -> list[bytearray]:
    """What arrives from the wire: one separate buffer per frame."""
    return [bytearray(bytes(f)) for f in frames]


def test_mesh_round_trip_keeps_every_field_and_array():
    job = new_id()
    msg = Message("mesh", {"stage": "geometry", "step": 12, "final": False, "object_id": "Cube.001"}, _mesh(), job=job, seq=7)
    out = decode(_as_frames(encode(msg)))
    assert (out.type, out.job, out.seq, out.id, out.parent) == ("mesh", job, 7, msg.id, None)
    assert out.fields == msg.fields
    assert set(out.arrays) == set(msg.arrays)
    for name, arr in msg.arrays.items():
        assert out.arrays[name].dtype == arr.dtype and out.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(out.arrays[name], arr)


def test_decoded_arrays_view_the_frame_memory_without_copying():
    frames = _as_frames(encode(Message("preview", {"stage": "stage1", "step": 3},
                                       {"image": np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)}, job=new_id())))
    out = decode(frames)
    image = out.arrays["image"]
    assert np.shares_memory(image, np.frombuffer(frames[1], dtype=np.uint8))
    frames[1][0] = 250  # writing the frame shows through the array: same memory
    assert image[0, 0, 0] == 250


def test_encoding_hands_contiguous_arrays_over_without_copying():
    verts = np.zeros((10, 3), np.float32)
    frames = encode(Message("submit", {"prompt": "a"}, {"vertices": verts, "faces": np.zeros((1, 3), np.int32)}))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), verts)


def test_submit_with_all_spec_fields_round_trips():
    fields = {"prompt": "a hamburger", "negative_prompt": "blurry", "seed": 42, "method": "vsd", "preset": "smoke",
              "overrides": {"stage1.steps": 10, "texture.lr_grid": 0.5, "export.write_obj": True, "stage1.cameras.elevation": [0, 30]},
              "start_stage": "texture", "start_t": 0.4, "object_id": "obj-1", "subscribe": True}
    out = decode(_as_frames(encode(Message("submit", fields, _mesh()))))
    assert out.fields == fields


def _raw(header: dict, *frames: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _header(**kw) -> dict:
    h = {"v": PROTOCOL_VERSION, "type": "ping", "id": new_id(), "job": None, "seq": None, "parent": None, "fields": {},
         "buffers": []}
    h.update(kw)
    return h


@pytest.mark.parametrize("frames, words", [
    ([b""], "not valid msgpack"),
    ([msgpack.packb(_header())[:-5]], "not valid msgpack"),
    ([b"\x93\x01\x02\x03"], "must be a msgpack map"),
    (_raw(_header(v=99)), "protocol version 99"),
    (_raw(_header(type="launch_missiles")), "unknown message type 'launch_missiles'"),
    (_raw(_header(type="submit", fields={"prompt": 5})), "field 'prompt' must be a string"),
    (_raw(_header(type="submit", fields={"prompt": "x", "seed": "one"})), "field 'seed' must be an integer"),
    (_raw(_header(type="submit", fields={"prompt": "x", "method": "magic"})), "not one of apfo"),
    (_raw(_header(type="submit", fields={"prompt": "x", "colour": 1})), "unknown field 'colour'"),
    (_raw(_header(type="submit", fields={})), "missing required field 'prompt'"),
    (_raw(_header(type="submit", fields={"prompt": "x" * 5000})), "over the limit of 4096"),
    (_raw(_header(type="submit", fields={"prompt": "x", "start_t": float("nan")})), "must be finite"),
    (_raw(_header(type="cancel")), "needs a job id"),
    (_raw(_header(type="cancel", job="../../etc")), "job id must be"),
    (_raw(_header(id="not-hex")), "message id must be"),
    (_raw(_header(seq=3)), "takes no sequence number"),
    (_raw(_header(extra=1)), "unknown key"),
    (_raw(_header(type="submit", fields={"prompt": "x"}, buffers=[{"name": "vertices", "dtype": "float32", "shape": [2, 3]}]),
          b"\0" * 20), "= 24 bytes, but its frame holds 20"),
    (_raw(_header(type="submit", fields={"prompt": "x"}, buffers=[{"name": "vertices", "dtype": "object", "shape": [1]}]),
          b"\0" * 8), "dtype 'object'"),
    (_raw(_header(type="submit", fields={"prompt": "x"}, buffers=[{"name": "vertices", "dtype": "float64", "shape": [1, 3]}]),
          b"\0" * 24), "must be float32"),
    (_raw(_header(type="submit", fields={"prompt": "x"}, buffers=[{"name": "vertices", "dtype": "float32", "shape": [1, 3]}])),
     "describes 1 buffers but 0 data frames"),
    (_raw(_header(type="submit", fields={"prompt": "x"}, buffers=[{"name": "weights", "dtype": "uint8", "shape": [1]}]), b"\0"),
     "unexpected array 'weights'"),
    (_raw(_header(fields={"t": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}})), "nested deeper"),
])
def test_bad_messages_raise_an_error_that_names_the_problem(frames, words):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert words in str(info.value)


def test_error_carries_the_id_of_a_readable_header():
    header = _header(type="submit", fields={"prompt": 1})
    with pytest.raises(ProtocolError) as info:
        decode(_raw(header))
    assert info.value.parent == header["id"]


def test_size_limits_apply_to_header_frames_and_buffer_count():
    limits = Limits(max_header_bytes=512, max_frame_bytes=1000, max_buffers=2)
    with pytest.raises(ProtocolError, match="header frame is .* over the limit of 512"):
        decode(_raw(_header(fields={"t": 1.0}, pad="x" * 600)), limits)
    tex = np.zeros((20, 20, 3), np.uint8)  # 1200 bytes
    frames = encode(Message("preview", {"stage": "stage1", "step": 0}, {"image": tex}, job=new_id()))
    with pytest.raises(ProtocolError, match="frame 1 .* 1200 bytes, over the limit of 1000"):
        decode(frames, limits)
    with pytest.raises(ProtocolError, match="4 buffers, over the limit of 2"):
        decode(encode(Message("submit", {"prompt": "p"}, _mesh(texture=False))), limits)


def test_mesh_contents_are_checked():
    bad = _mesh()
    bad["vertices"] = bad["vertices"].copy()
    bad["vertices"][0, 0] = np.nan
    with pytest.raises(ProtocolError, match="NaN"):
        decode(_as_frames(encode(Message("mesh", {"stage": "stage1", "step": 0, "final": False}, _mesh(), job=new_id()),
                                 validate=False)[:1] + _as_frames(encode(Message("submit", {"prompt": "p"}, bad), validate=False))[1:]))
    out_of_range = _mesh()
    out_of_range["faces"] = out_of_range["faces"] + 100
    with pytest.raises(ProtocolError, match="face indices"):
        encode(Message("submit", {"prompt": "p"}, out_of_range))


def test_every_type_has_a_schema_and_sender_side_validation_matches():
    assert {"hello", "capabilities", "submit", "accepted", "progress", "preview", "mesh", "stage_done", "job_done", "error",
            "cancel", "cancelled", "status", "status_reply", "list_jobs", "jobs", "subscribe", "fetch", "result", "ping",
            "pong", "busy", "log"} <= set(SCHEMAS)
    with pytest.raises(ProtocolError, match="must be an integer"):
        encode(Message("progress", {"stage": "stage1", "step": 1.5, "total": 3}, job=new_id()))
