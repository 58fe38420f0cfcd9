"""Input meshes for refinement: clear errors for unusable ones, the box frame, topology kept by baking."""

import numpy as np
import pytest
import torch
import trimesh

from dreamflow.events import JobControl, NullSink
from dreamflow.export.mesh import MeshData, MeshError
from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.job import run_job
from dreamflow.pipeline.refine_input import InputFrame, validate_input_mesh
from dreamflow.pipeline.mesh_stage import textured_mesh


def _box() -> MeshData:
    b = trimesh.creation.box(extents=(0.5, 0.4, 0.3))
    return MeshData(np.asarray(b.vertices, np.float32), np.asarray(b.faces, np.int32))


def _non_manifold() -> MeshData:
    m = _box()
    # A fin: a third triangle on an existing edge makes that edge shared by three faces.
    e0, e1 = m.faces[0, 0], m.faces[0, 1]
    v = np.vstack([m.vertices, [[0.0, 0.0, 0.45]]]).astype(np.float32)
    f = np.vstack([m.faces, [[e0, e1, len(m.vertices)]]]).astype(np.int32)
    return MeshData(v, f)


def _nan() -> MeshData:
    m = _box()
    m.vertices[3, 1] = np.nan
    return m


def _out_of_range() -> MeshData:
    m = _box()
    m.faces[5, 2] = len(m.vertices) + 7
    return m


def _negative_index() -> MeshData:
    m = _box()
    m.faces[2, 0] = -1
    return m


def _empty() -> MeshData:
    return MeshData(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))


@pytest.mark.parametrize("make, stage, words", [
    (_non_manifold, "geometry", "not manifold"),
    (_nan, "texture", "NaN"),
    (_out_of_range, "refine", "outside [0, 7]"),
    (_negative_index, "texture", "outside [0, 7]"),
    (_empty, "geometry", "empty"),
])
def test_bad_input_meshes_give_clear_errors(make, stage, words):
    with pytest.raises(MeshError, match=words.replace("[", r"\[").replace("]", r"\]")):
        validate_input_mesh(make(), stage)


def test_texture_only_accepts_a_non_manifold_mesh_and_geometry_does_not():
    validate_input_mesh(_non_manifold(), "texture")
    with pytest.raises(MeshError):
        validate_input_mesh(_non_manifold(), "geometry")


def test_run_job_rejects_a_bad_input_mesh_before_any_work(tmp_path):
    cfg = build_config("smoke")
    with pytest.raises(MeshError, match="NaN"):
        run_job(cfg, tmp_path, NullSink(), JobControl(), input_mesh=_nan(), start_stage="texture")
    assert not (tmp_path / "model.glb").exists()


def test_large_inputs_are_moved_into_the_box_and_back_exactly_enough():
    m = _box()
    big = MeshData(m.vertices * 40.0 + np.array([100.0, -5.0, 3.0], np.float32), m.faces)
    frame = InputFrame.fit(big.vertices)
    boxed = frame.to_box(big)
    assert np.abs(boxed.vertices).max() <= 0.41
    back = frame.from_box(boxed)
    assert np.allclose(back.vertices, big.vertices, atol=1e-4)
    assert InputFrame.fit(m.vertices).identity


def test_baking_without_uvs_keeps_faces_and_vertex_positions():
    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    v = torch.tensor(ico.vertices, dtype=torch.float32)
    f = torch.tensor(ico.faces)
    out = textured_mesh(v, f, lambda p: (p + 0.5).clamp(0, 1), 64)
    assert len(out.faces) == len(ico.faces)
    assert np.allclose(out.vertices[out.faces], ico.vertices[ico.faces], atol=1e-6)
    assert out.uvs is not None and out.texture.shape == (64, 64, 3)
    # With UVs given, the arrays themselves are kept.
    uvs = np.random.default_rng(0).random((len(ico.vertices), 2)).astype(np.float32)
    kept = textured_mesh(v, f, lambda p: (p + 0.5).clamp(0, 1), 32, uvs=uvs)
    assert np.array_equal(kept.faces, ico.faces.astype(np.int32))
    assert np.allclose(kept.vertices, ico.vertices, atol=1e-7) and np.array_equal(kept.uvs, uvs)
