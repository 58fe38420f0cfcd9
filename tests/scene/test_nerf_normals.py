"""The NeRF's normals: the closed-form density gradient against finite differences."""

import torch
import torch.nn.functional as F

from dreamflow.scene.hashgrid import HashGridConfig
from dreamflow.scene.nerf import FieldSettings, NerfField

GRID = HashGridConfig(levels=4, log2_table_size=12, features_per_level=2, base_resolution=4, max_resolution=16)


def lumpy_field(seed: int = 0) -> NerfField:
    """A field whose grid and MLP both shape the density (not just the ball of the bias)."""
    field = NerfField(FieldSettings(grid=GRID, mlp_width=16, density_bias_scale=4.0), seed=seed)
    with torch.no_grad():
        field.grid.params.uniform_(-2.0, 2.0)
    return field


def test_density_gradient_matches_central_differences():
    field = lumpy_field()
    x = (torch.rand(400, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8
    sigma, grad = field.density_gradient(x)
    assert torch.allclose(sigma, field.density(x), atol=1e-5)
    eps = 1e-3
    offsets = torch.eye(3) * eps
    fd = torch.stack([(field.density(x + offsets[d]) - field.density(x - offsets[d])) / (2 * eps) for d in range(3)], -1)
    # Central differences across a cell face average two slopes; everywhere else they agree.
    cos = F.cosine_similarity(grad, fd, dim=-1)
    assert cos.median() > 0.9999
    assert (cos > 0.99).float().mean() > 0.95
    assert grad.norm(dim=-1).median() > 1.0    # a real gradient, not a vanishing one


def test_normals_agree_with_the_finite_difference_normals_and_train_the_field():
    field = lumpy_field(seed=2)
    x = (torch.rand(400, 3, generator=torch.Generator().manual_seed(4)) - 0.5) * 0.8
    sigma = field.density(x)
    exact = field.normals(x, sigma)
    forward = field.normals_finite_difference(x, sigma)
    assert torch.allclose(exact.norm(dim=-1), torch.ones(400), atol=1e-5)
    # Forward differences of step 0.01 see the curvature and the grid's cells: close, not equal.
    cos = (exact * forward).sum(-1)
    assert cos.median() > 0.99
    assert (cos > 0.9).float().mean() > 0.9
    (exact[:, 2].sum()).backward()
    assert field.grid.params.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.mlp.parameters())


def test_a_ball_has_radial_normals():
    field = NerfField(FieldSettings(grid=GRID, mlp_width=8))
    with torch.no_grad():
        field.mlp[-1].weight.zero_()        # density is the bias alone: a ball about the origin
    x = F.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), dim=-1) * 0.3
    normals = field.normals(x, field.density(x))
    assert torch.allclose(normals, F.normalize(x, dim=-1), atol=1e-5)
