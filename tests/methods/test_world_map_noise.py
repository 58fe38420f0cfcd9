"""FSD's world-map noise: deterministic per camera, different across azimuths, resumable."""

import torch

from dreamflow.methods.noise import WorldMapNoise
from dreamflow.scene.cameras import Cameras


def like():
    return torch.zeros(1, 4, 8, 8)


def cams(az, el=10.0):
    return Cameras.make(az, el, 1.2, 50.0)


def test_same_camera_same_noise_and_azimuth_changes_it():
    noise = WorldMapNoise(beta=1.0, seed=3)
    a = noise.sample(like(), cams(30.0), None, None)
    b = noise.sample(like(), cams(30.0), None, None)
    assert torch.equal(a, b)
    c = noise.sample(like(), cams(120.0), None, None)
    assert not torch.allclose(a, c)
    assert torch.equal(noise.sample(like(), cams(-30.0), None, None), noise.sample(like(), cams(330.0), None, None))
    # A small azimuth change shifts the patch: neighbouring views share most of their noise.
    d = noise.sample(like(), cams(30.0 + 360.0 / 32), None, None)  # one column of a 32-wide map
    assert torch.equal(a[..., 1:], d[..., :-1])
    assert abs(float(a.std()) - 1.0) < 0.3


def test_background_mask_and_blend():
    noise = WorldMapNoise(beta=1.0, seed=1)
    alpha = torch.zeros(1, 1, 64, 64)
    alpha[..., :32, :] = 1.0  # top half opaque, at render resolution (8x the latent)
    n1 = noise.sample(like(), cams(0.0), alpha, None)
    n2 = noise.sample(like(), cams(90.0), alpha, None)
    assert torch.equal(n1[..., 4:, :], n2[..., 4:, :])   # background: the same fixed noise
    assert not torch.allclose(n1[..., :4, :], n2[..., :4, :])
    blended = WorldMapNoise(beta=0.5, seed=1)
    g = torch.Generator().manual_seed(0)
    m1 = blended.sample(like(), cams(0.0), alpha, g)
    m2 = blended.sample(like(), cams(0.0), alpha, g)
    assert not torch.allclose(m1, m2)  # fresh part differs
    fresh = (m1 - 0.5 ** 0.5 * n1) / 0.5 ** 0.5  # what is left after the fixed part
    assert 0.6 < float(fresh.std()) < 1.4
    assert float((fresh * n1).mean()).__abs__() < 0.3


def test_state_round_trip_and_particle_slots():
    noise = WorldMapNoise(seed=5)
    first = noise.sample(like(), cams(45.0, 30.0), None, None)
    restored = WorldMapNoise(seed=99)
    restored.load_state_dict(noise.state_dict())
    assert torch.equal(restored.sample(like(), cams(45.0, 30.0), None, None), first)
    slots = WorldMapNoise(seed=2)
    p = slots.sample(torch.zeros(3, 3, 4, 4), None, None, None)
    assert torch.equal(p, slots.sample(torch.zeros(3, 3, 4, 4), None, None, None))
    assert not torch.allclose(p[0], p[1])
