"""Density -> textured mesh -> GLB/OBJ, and back: the file holds exactly the mesh the events carry."""

import numpy as np
import pytest
import torch

from dreamflow.export.bake import bake_texture
from dreamflow.export.extract import extract_textured_mesh, marching_cubes, signed_volume, simplify
from dreamflow.export.files import read_glb, write_glb, write_obj
from dreamflow.export.mesh import MeshData, MeshError
from dreamflow.pipeline.metrics import chamfer_relative


def ball_density(x: torch.Tensor) -> torch.Tensor:
    """A ball of radius 0.3 with a small floater near a corner."""
    ball = 20.0 * (0.3 - x.norm(dim=-1)).clamp(min=-1.0) * 10.0
    floater = 50.0 * ((x - torch.tensor([0.4, 0.4, 0.4])).norm(dim=-1) < 0.04).float()
    return ball.clamp(min=0.0) + floater


def position_colour(x: torch.Tensor) -> torch.Tensor:
    """Colour = position mapped into [0, 1] (any UV or axis mix-up shows)."""
    return (x / 0.6 + 0.5).clamp(0.0, 1.0)


@pytest.fixture(scope="module")
def ball_mesh() -> MeshData:
    return extract_textured_mesh(ball_density, position_colour, resolution=40, level=10.0, face_budget=1500,
                                 texture_size=128)


def test_extracted_mesh_is_clean_outward_and_within_budget(ball_mesh):
    m = ball_mesh
    assert len(m.faces) <= 1500
    assert m.uvs is not None and m.normals is not None and m.texture.shape == (128, 128, 3)
    assert signed_volume(m.vertices, m.faces) > 0
    assert np.linalg.norm(m.vertices, axis=1).max() < 0.36  # the floater was dropped
    radial = np.einsum("ij,ij->i", m.normals, m.vertices / np.linalg.norm(m.vertices, axis=1, keepdims=True))
    assert np.median(radial) > 0.9


def test_baked_texture_matches_the_colour_field_at_the_vertices(ball_mesh):
    m = ball_mesh
    h, w = m.texture.shape[:2]
    # Texel under each vertex's UV (v up, row 0 at the top).
    cols = np.clip((m.uvs[:, 0] * w).astype(int), 0, w - 1)
    rows = np.clip(((1.0 - m.uvs[:, 1]) * h).astype(int), 0, h - 1)
    got = m.texture[rows, cols].astype(np.float32) / 255.0
    want = position_colour(torch.as_tensor(m.vertices)).numpy()
    assert np.median(np.abs(got - want)) < 0.03


def test_glb_round_trip_is_the_same_mesh(ball_mesh, tmp_path):
    import trimesh

    path = write_glb(ball_mesh, tmp_path / "model.glb")
    raw = trimesh.load(path, force="mesh", process=False)
    assert raw.visual.kind == "texture" and raw.visual.uv is not None
    assert raw.visual.material.baseColorTexture is not None
    # glTF is Y-up: the ball's top (+Z here) is +Y in the file.
    assert np.isclose(raw.vertices[:, 1].max(), ball_mesh.vertices[:, 2].max(), atol=1e-6)
    back = read_glb(path)
    np.testing.assert_allclose(back.vertices, ball_mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, ball_mesh.faces)
    np.testing.assert_allclose(back.uvs, ball_mesh.uvs, atol=1e-6)
    np.testing.assert_array_equal(back.texture, ball_mesh.texture)


def test_obj_with_material_and_texture(ball_mesh, tmp_path):
    import trimesh

    written = write_obj(ball_mesh, tmp_path / "model.obj")
    assert {p.name for p in written} == {"model.obj", "model.mtl", "model_albedo.png"}
    loaded = trimesh.load(tmp_path / "model.obj", force="mesh", process=False)
    assert loaded.visual.kind == "texture" and loaded.visual.uv is not None
    assert len(loaded.faces) == len(ball_mesh.faces)


def test_simplify_and_bad_fields():
    with pytest.raises(MeshError, match="never crosses"):
        marching_cubes(np.zeros((8, 8, 8), dtype=np.float32), 1.0)
    with pytest.raises(MeshError, match="NaN"):
        marching_cubes(np.full((8, 8, 8), np.nan, dtype=np.float32), 1.0)
    import trimesh

    s = trimesh.creation.icosphere(4)
    m = simplify(MeshData(s.vertices.astype(np.float32), s.faces.astype(np.int32)), 500)
    assert len(m.faces) <= 500 and chamfer_relative(m, MeshData(s.vertices, s.faces), count=4000) < 0.01


def test_chamfer_relative_is_scale_aware():
    import trimesh

    s = trimesh.creation.icosphere(3, radius=0.3)
    ref = MeshData(s.vertices.astype(np.float32), s.faces.astype(np.int32))
    same = chamfer_relative(ref, ref, count=5000)
    bigger = chamfer_relative(MeshData(ref.vertices * 1.1, ref.faces), ref, count=5000)
    # Sampling noise only, versus a 10 % larger sphere: 0.03 / (0.6 sqrt 3) ~ 0.029.
    assert same < 0.01 and 0.02 < bigger < 0.04


def test_baking_needs_uvs():
    with pytest.raises(ValueError, match="UVs"):
        bake_texture(MeshData(np.zeros((3, 3), np.float32), np.array([[0, 1, 2]], np.int32)), position_colour, 8)
