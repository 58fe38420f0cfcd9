"""Volume rendering: exact compositing, empty-space skipping that changes nothing, gradients into the field."""

import math

import torch

from dreamflow.render.volume import OccupancyGrid, ray_box, render_cameras, render_rays
from dreamflow.scene.cameras import Cameras
from dreamflow.scene.hashgrid import HashGridConfig
from dreamflow.scene.nerf import FieldSettings, NerfField

SMALL = FieldSettings(HashGridConfig(levels=4, log2_table_size=12, features_per_level=2, base_resolution=4,
                                     max_resolution=32), mlp_width=16, background_width=8, background_frequencies=2)


class ConstantField(torch.nn.Module):
    """Density ``c`` inside a ball of radius r, zero outside; red albedo; blue background."""

    def __init__(self, c: float, radius: float = 10.0):
        super().__init__()
        self.c, self.radius = c, radius

    def forward(self, x):
        inside = (x.norm(dim=-1) < self.radius).float()
        return self.c * inside, torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)

    def density(self, x):
        return self.forward(x)[0]

    def background(self, d):
        return torch.tensor([0.0, 0.0, 1.0]).expand(d.shape[0], 3)


def test_ray_box_distances():
    o = torch.tensor([[0.0, -2.0, 0.0], [0.0, -2.0, 0.9]])
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    near, far = ray_box(o, d)
    torch.testing.assert_close(near[0], torch.tensor(1.5))
    torch.testing.assert_close(far[0], torch.tensor(2.5))
    assert far[1] <= near[1]  # passes above the box


def test_compositing_matches_beer_lambert():
    o = torch.tensor([[0.0, -2.0, 0.0]])
    d = torch.tensor([[0.0, 1.0, 0.0]])
    out = render_rays(ConstantField(2.0), o, d, samples=64, perturb=False)
    opacity = 1.0 - math.exp(-2.0 * 1.0)  # chord length 1 through the unit box
    torch.testing.assert_close(out.opacity, torch.tensor([opacity]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rgb[0], torch.tensor([opacity, 0.0, 1.0 - opacity]), atol=1e-4, rtol=0)
    assert 1.5 < float(out.depth[0] / out.opacity[0]) < 2.5


def test_empty_space_skipping_changes_nothing_but_the_work():
    field = ConstantField(30.0, radius=0.2)
    occ = OccupancyGrid(16, threshold=0.5)
    occ.update(field.density)
    assert 0.0 < occ.occupied_fraction() < 0.2
    cams = Cameras.make([0.0, 120.0], [10.0, -5.0], 1.2, 50.0)
    full = render_cameras(field, cams, 16, 16, 48, None, perturb=False)
    skipped = render_cameras(field, cams, 16, 16, 48, occ, perturb=False)
    torch.testing.assert_close(skipped.image, full.image, atol=1e-5, rtol=0)
    assert skipped.samples_evaluated < 0.3 * full.samples_evaluated


def test_gradients_are_finite_and_reach_every_part_of_the_field():
    field = NerfField(SMALL, seed=0)
    occ = OccupancyGrid(8)
    occ.update(field.density)
    cams = Cameras.make([30.0], [20.0], 1.2, 50.0)
    out = render_cameras(field, cams, 12, 12, 16, occ, perturb=True, generator=torch.Generator().manual_seed(0),
                         orientation=True)
    assert out.image.shape == (1, 3, 12, 12) and out.alpha.shape == (1, 1, 12, 12)
    loss = (out.image - 0.3).pow(2).mean() + 0.1 * out.orientation
    loss.backward()
    for name, params in (("grid", field.grid_parameters()), ("mlp", field.mlp_parameters()),
                         ("background", field.background_parameters())):
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        assert torch.isfinite(grads).all(), name
        assert float(grads.abs().sum()) > 0, name
    assert float(out.orientation.detach()) >= 0


def test_density_bias_is_the_papers_blob():
    field = NerfField(SMALL, seed=0)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(field.density_bias(x), torch.tensor([10.0, 5.0, 0.0]))
    sigma = field.density(x)
    assert sigma[0] > sigma[1] > sigma[2] > 0
