"""Hash-grid encoding: tinycudann's numbers, resolution schedule, continuity, gradients."""

import math

import numpy as np
import pytest
import torch

from dreamflow.scene.hashgrid import (HASH_PRIMES, HashGridConfig, TorchHashGrid, available_backends, make_hash_grid,
                                      per_level_scale)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(levels=6, log2_table_size=12, features_per_level=2, base_resolution=4, max_resolution=64)


def naive_encoding(params: torch.Tensor, x: torch.Tensor, levels: int, log2_table_size: int, features: int,
                   base_resolution: int, max_resolution: int) -> torch.Tensor:
    """Instant NGP's definition, written point by point with Python integers (the test oracle)."""
    b = per_level_scale(levels, base_resolution, max_resolution)
    table = params.detach().double().cpu().view(-1, features)
    out = torch.zeros(x.shape[0], levels * features, dtype=torch.float64)
    offset = 0
    for level in range(levels):
        scale = float(torch.tensor(2.0 ** (level * math.log2(b)), dtype=torch.float32) * base_resolution - 1.0)
        res = math.ceil(scale) + 1
        size = min(((res ** 3 + 7) // 8) * 8, 2 ** log2_table_size)
        for n, p in enumerate(x.float().cpu().tolist()):
            pos = [float(np.float32(np.float32(c) * np.float32(scale)) + np.float32(0.5)) for c in p]
            g = [math.floor(c) for c in pos]
            f = [c - math.floor(c) for c in pos]
            for corner in range(8):
                bits = [(corner >> d) & 1 for d in range(3)]
                q = [g[d] + bits[d] for d in range(3)]
                w = math.prod(f[d] if bits[d] else 1.0 - f[d] for d in range(3))
                if res ** 3 <= size:
                    idx = q[0] + q[1] * res + q[2] * res * res
                else:
                    idx = 0
                    for d in range(3):
                        idx ^= (q[d] * HASH_PRIMES[d]) & 0xFFFFFFFF
                idx %= size
                out[n, level * features:(level + 1) * features] += w * table[offset + idx]
        offset += size
    return out.float()


# The CUDA twin is listed everywhere and shows as skipped, with the reason, where it cannot run.
BACKENDS = ["torch", pytest.param("tcnn", marks=pytest.mark.skipif(
    "tcnn" not in available_backends(DEVICE), reason="needs CUDA (tinycudann on a CUDA device)"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_instant_ngp_definition(backend):
    grid = make_hash_grid(HashGridConfig(**CONFIG), device=DEVICE, backend=backend, seed=3)
    with torch.no_grad():  # scale the tiny initial values up so that differences would show
        grid.params.mul_(1e4)
    x = torch.rand(16, 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = grid(x).float().cpu()
    want = naive_encoding(grid.params, x, CONFIG["levels"], CONFIG["log2_table_size"], CONFIG["features_per_level"],
                          CONFIG["base_resolution"], CONFIG["max_resolution"])
    assert got.shape == (16, CONFIG["levels"] * CONFIG["features_per_level"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if backend == "tcnn":  # the twin, given the same parameters, gives the same numbers
        twin = TorchHashGrid(**CONFIG).to(DEVICE)
        with torch.no_grad():
            twin.params.copy_(grid.params.float())
        torch.testing.assert_close(twin(x).cpu(), got, rtol=1e-4, atol=1e-4)


def test_resolution_schedule_and_table_sizes():
    g = TorchHashGrid(levels=8, log2_table_size=15, features_per_level=2, base_resolution=8, max_resolution=256)
    assert g.resolutions == sorted(g.resolutions) and g.resolutions[0] == 8 and g.resolutions[-1] == 256
    ratios = [g.resolutions[i + 1] / g.resolutions[i] for i in range(7)]
    assert all(1.4 < r < 1.9 for r in ratios)
    for res, size in zip(g.resolutions, g.table_sizes):
        assert size == min(((res ** 3 + 7) // 8) * 8, 2 ** 15)
    assert g.params.numel() == sum(g.table_sizes) * 2
    assert float(g.params.detach().abs().max()) <= 1e-4  # Instant NGP's uniform initialisation


def test_encoding_is_continuous_and_its_gradient_is_the_interpolation_weights():
    g = TorchHashGrid(**CONFIG, seed=0)
    with torch.no_grad():
        g.params.normal_()
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(2)) * 0.98 + 0.01
    with torch.no_grad():
        step = (g(x + 1e-5) - g(x)).abs().max()
        jump = (g(x + 0.2) - g(x)).abs().max()
    assert float(step) < 1e-2 < float(jump)
    g.params.grad = None
    g(x[:1]).sum().backward()
    grad = g.params.grad.view(-1, CONFIG["features_per_level"])
    # Trilinear weights of each level sum to one, for each feature.
    torch.testing.assert_close(grad.sum(0), torch.full((CONFIG["features_per_level"],), float(CONFIG["levels"])))
    assert int((grad[:, 0] != 0).sum()) <= 8 * CONFIG["levels"]


class _TcnnLikeEncoding(torch.nn.Module):
    """Stands in for tinycudann.Encoding with its backward's behaviour on an empty batch: the
    parameter gradient is a buffer the kernel never writes (here NaN, to make it visible)."""

    def __init__(self, n_input_dims, config, seed=1337, dtype=torch.float32):
        super().__init__()
        cfg = {k: config[k] for k in ("base_resolution", "per_level_scale")}
        levels, log2 = config["n_levels"], config["log2_hashmap_size"]
        max_res = round(cfg["base_resolution"] * cfg["per_level_scale"] ** (levels - 1))
        self.twin = TorchHashGrid(levels, log2, config["n_features_per_level"], cfg["base_resolution"], max_res, seed=seed)
        self.params = self.twin.params

    def forward(self, x):
        twin = self.twin

        class Encode(torch.autograd.Function):
            @staticmethod
            def forward(ctx, points, params):
                ctx.save_for_backward(points)
                return twin(points).detach()

            @staticmethod
            def backward(ctx, grad_out):
                (points,) = ctx.saved_tensors
                if points.shape[0] == 0:
                    return None, torch.full_like(twin.params, float("nan"))
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(twin(points), twin.params, grad_out)
                return None, g

        return Encode.apply(x, self.params)


def test_an_empty_batch_leaves_the_tinycudann_gradient_alone():
    """A ray chunk that misses every occupied cell sends no points; with tinycudann that call's
    backward must not reach the table, or uninitialised memory lands in the gradient."""
    from types import SimpleNamespace

    from dreamflow.scene.hashgrid import TcnnHashGrid

    grid = TcnnHashGrid(SimpleNamespace(Encoding=_TcnnLikeEncoding), **CONFIG)
    x = torch.rand(32, 3, generator=torch.Generator().manual_seed(3))
    torch.cat([grid(x), grid(x[:0])]).square().sum().backward()
    with_empty = grid.params.grad.clone()
    grid.params.grad = None
    grid(x).square().sum().backward()
    assert torch.isfinite(with_empty).all()
    torch.testing.assert_close(with_empty, grid.params.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_form_jacobian_is_autograds_and_keeps_the_encoding(backend):
    # Both levels kinds (dense and hashed) and random, large table entries so every level matters.
    grid = make_hash_grid(HashGridConfig(**CONFIG), device=DEVICE, backend=backend, seed=3)
    with torch.no_grad():
        grid.params.uniform_(-1.0, 1.0)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    feats, jac = grid.forward_with_jacobian(x)
    assert torch.allclose(feats, grid(x), atol=1e-4)
    # The oracle: autograd through the PyTorch twin holding the same table.
    twin = TorchHashGrid(**CONFIG).to(DEVICE)
    with torch.no_grad():
        twin.params.copy_(grid.params.float())
    expected = torch.autograd.functional.jacobian(lambda p: twin(p).sum(0), x).permute(1, 0, 2)
    assert jac.shape == (64, grid.output_dim, 3)
    assert torch.allclose(jac, expected, atol=1e-4, rtol=1e-4)
    # It stays differentiable in the table (the orientation loss trains through it).
    jac.square().sum().backward()
    assert grid.params.grad is not None and grid.params.grad.abs().sum() > 0
