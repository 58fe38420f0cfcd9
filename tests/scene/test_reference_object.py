"""The built-in reference house, mesh loading, and the camera convention seen through renders."""

import numpy as np
import pytest
import torch

from dreamflow.export.mesh import MeshError
from dreamflow.priors.reference import ReferenceObjectPrior, ReferenceRenderer
from dreamflow.scene import reference_object as ro
from dreamflow.scene.cameras import Cameras


@pytest.fixture(scope="module")
def house_renderer():
    return ReferenceRenderer(ro.builtin_house())


def colour_mask(image: torch.Tensor, colour, tol: float = 0.12) -> np.ndarray:
    """(H, W) bool: pixels of a (3, H, W) image within ``tol`` of an RGB uint8 colour."""
    c = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255.0
    return ((image - c).abs().amax(0) < tol).numpy()


def test_house_is_a_closed_textured_mesh_inside_the_box():
    m = ro.builtin_house().validate(require_manifold=True)
    assert m.uvs is not None and m.texture is not None and m.texture.dtype == np.uint8
    assert np.abs(m.vertices).max() <= 0.5
    assert np.isclose((m.vertices.max(0) - m.vertices.min(0)).max(), ro.NORMALISED_EXTENT)


def test_front_view_shows_the_door_left_and_the_window_right(house_renderer):
    # Azimuth 0: camera on -Y looking at +Y, world +X to the right of the image, +Z up.
    img = house_renderer.render(Cameras.make(0.0, 0.0, 1.3, 50.0), 64)[0][0]
    door, window = colour_mask(img, ro.DOOR), colour_mask(img, ro.WINDOW)
    assert door.sum() > 20 and window.sum() > 10
    cols = np.arange(64)
    assert (cols[None] * door).sum() / door.sum() < 32 < (cols[None] * window).sum() / window.sum()
    rows = np.arange(64)[:, None]
    chimney = colour_mask(img, ro.CHIMNEY)
    roof = colour_mask(img, ro.ROOF_FRONT)
    # Roof above the door (row 0 is the top); the chimney peeks out on the right.
    assert (rows * roof).sum() / roof.sum() < (rows * door).sum() / door.sum()
    assert chimney.sum() > 3 and (cols[None] * chimney).sum() / chimney.sum() > 32
    assert not colour_mask(img, ro.SIDE_WINDOW).any()


def test_the_green_window_faces_minus_x_only(house_renderer):
    left, right, back = house_renderer.render(Cameras.make([-90.0, 90.0, 180.0], 0.0, 1.3, 50.0), 48)[0]
    assert colour_mask(left, ro.SIDE_WINDOW).sum() > 10      # camera on -X sees the green window
    assert not colour_mask(right, ro.SIDE_WINDOW).any()
    assert not colour_mask(back, ro.DOOR).any()


def test_reference_prior_is_the_exact_gaussian_denoiser(house_renderer):
    prior = ReferenceObjectPrior(house_renderer, std=0.1)
    cams = Cameras.make([10.0, 200.0], [5.0, 30.0], 1.2, 50.0)
    mu = prior.mean(cams, 24, 24)
    x = torch.rand(2, 3, 24, 24)
    for sigma in (0.0, 0.1, 5.0):
        want = mu + 0.01 / (0.01 + sigma ** 2) * (x - mu)
        torch.testing.assert_close(prior.denoise(x, torch.tensor(sigma), prior.condition(""), cams), want)
    # Stable Diffusion's table: t means the same noise level as with the real prior (method.md).
    assert abs(float(prior.sigma(0.5)) - 1.62) < 0.02 and abs(float(prior.sigma(0.999)) - 14.61) < 0.05
    with pytest.raises(ValueError, match="cameras"):
        prior.denoise(x, 1.0, prior.condition(""), None)


def test_loading_a_mesh_file_normalises_it_and_rejects_non_meshes(tmp_path):
    import trimesh

    box = trimesh.creation.box(extents=(2.0, 4.0, 1.0))
    box.apply_translation((5.0, 0.0, 0.0))
    path = tmp_path / "box.ply"
    box.export(path)
    mesh, colours, _ = ro.load_reference(path)
    assert np.isclose((mesh.vertices.max(0) - mesh.vertices.min(0)).max(), ro.NORMALISED_EXTENT)
    assert np.allclose(mesh.vertices.mean(0), 0.0, atol=1e-6)
    assert colours.shape == (len(mesh.vertices), 3)
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a mesh\n")
    with pytest.raises(MeshError, match="not a mesh"):
        ro.load_reference(bad)
    with pytest.raises(MeshError, match="does not exist"):
        ro.load_reference(tmp_path / "missing.glb")


def _coloured_quad(kind: str):
    """Two triangles (a unit square, 4 vertices) carrying one kind of trimesh colour visual."""
    import trimesh
    from PIL import Image

    mesh = trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], faces=[[0, 1, 2], [0, 2, 3]],
                           process=False)
    if kind == "vertex":
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.array(
            [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [255, 255, 0, 255]], np.uint8))
    elif kind == "face":
        mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=np.array([[255, 0, 0, 255], [0, 0, 255, 255]], np.uint8))
    elif kind == "texture":
        image = np.zeros((4, 4, 3), np.uint8)
        image[:, :2] = (255, 0, 0)
        image[:, 2:] = (0, 255, 0)
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(image))
        mesh.visual = trimesh.visual.TextureVisuals(uv=[[0, 0], [1, 0], [1, 1], [0, 1]], material=material)
    elif kind == "material":
        mesh.visual = trimesh.visual.TextureVisuals(
            material=trimesh.visual.material.PBRMaterial(baseColorFactor=[51, 102, 204, 255]))
    return mesh


@pytest.mark.parametrize("kind, ext, source", [
    ("vertex", "ply", "vertex colours"), ("vertex", "glb", "vertex colours"), ("vertex", "obj", "vertex colours"),
    ("face", "ply", "face colours"), ("texture", "glb", "texture"), ("texture", "obj", "texture"),
    ("material", "glb", "material colour"), ("material", "obj", "material colour")])
def test_a_reference_file_keeps_its_colours_whatever_visual_trimesh_gives(tmp_path, kind, ext, source):
    path = tmp_path / f"quad.{ext}"
    _coloured_quad(kind).export(path)
    loaded = ro.load_reference(path)
    assert loaded.colours_from == source
    mesh, colours = loaded.mesh, loaded.vertex_colours
    if source == "texture":
        assert colours is None and mesh.uvs is not None
        assert set(map(tuple, mesh.texture.reshape(-1, 3))) == {(255, 0, 0), (0, 255, 0)}
        return
    assert colours.shape == (len(mesh.vertices), 3)
    if kind == "vertex":
        assert {tuple(c) for c in colours.tolist()} == {(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)}
    elif kind == "face":
        # Each triangle keeps its own flat colour: its three corners carry it, unblended.
        assert len(mesh.vertices) == 6
        assert np.allclose(colours[mesh.faces[0]], (1, 0, 0)) and np.allclose(colours[mesh.faces[1]], (0, 0, 1))
    else:
        assert np.allclose(colours, (0.2, 0.4, 0.8))


def test_a_reference_file_without_colour_is_grey_and_says_so(tmp_path, caplog):
    path = tmp_path / "plain.ply"
    _coloured_quad("none").export(path)
    with caplog.at_level("WARNING", logger="dreamflow"):
        loaded = ro.load_reference(path)
    assert loaded.colours_from == "none" and np.allclose(loaded.vertex_colours, ro.NO_COLOUR_GREY)
    assert "has no colour" in caplog.text and "plain.ply" in caplog.text


def test_a_gltf_base_colour_factor_tints_its_texture(tmp_path):
    import trimesh
    from PIL import Image

    mesh = _coloured_quad("texture")
    image = np.asarray(mesh.visual.material.baseColorTexture)
    mesh.visual.material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(image),
                                                               baseColorFactor=[255, 128, 255, 255])
    mesh.export(tmp_path / "tinted.glb")
    loaded = ro.load_reference(tmp_path / "tinted.glb")
    assert set(map(tuple, loaded.mesh.texture.reshape(-1, 3).tolist())) == {(255, 0, 0), (0, 128, 0)}
