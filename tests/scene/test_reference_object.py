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
    mesh, colours = ro.load_reference(path)
    assert np.isclose((mesh.vertices.max(0) - mesh.vertices.min(0)).max(), ro.NORMALISED_EXTENT)
    assert np.allclose(mesh.vertices.mean(0), 0.0, atol=1e-6)
    assert colours.shape == (len(mesh.vertices), 3)
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a mesh\n")
    with pytest.raises(MeshError, match="not a mesh"):
        ro.load_reference(bad)
    with pytest.raises(MeshError, match="does not exist"):
        ro.load_reference(tmp_path / "missing.glb")
