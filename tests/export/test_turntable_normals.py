"""The turntable's normal-shaded row: flat faces are flat colours, lumps are many colours."""

import math

import numpy as np
import torch

from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.job import TURNTABLE_FOVY, TURNTABLE_VIEWS, render_asset, render_normals, turntable_distance, turntable_image
from dreamflow.scene.cameras import orbit

RES = 64


def _sphere(radius: float = 0.4, rings: int = 24, segments: int = 48) -> MeshData:
    theta = np.linspace(0, math.pi, rings + 1)
    phi = np.linspace(0, 2 * math.pi, segments + 1)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    verts = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3) * radius
    idx = np.arange((rings + 1) * (segments + 1)).reshape(rings + 1, segments + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    uvs = np.stack([p / (2 * math.pi), 1 - t / math.pi], -1).reshape(-1, 2)
    return MeshData(verts.astype(np.float32), faces.astype(np.int32), uvs=uvs.astype(np.float32),
                    texture=np.full((8, 8, 3), 180, np.uint8))


def _cube(half: float = 0.4) -> MeshData:
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)], np.float32)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.int32)
    return MeshData(corners, faces, uvs=np.zeros((8, 2), np.float32), texture=np.full((4, 4, 3), 90, np.uint8))


def _colours_per_view(images: torch.Tensor) -> list[int]:
    """Distinct 8-bit colours among each view's covered (non-white) pixels."""
    counts = []
    for img in (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8):
        covered = img[(img != 255).any(-1)]
        counts.append(len(np.unique(covered, axis=0)))
    return counts


def _cams():
    return orbit(TURNTABLE_VIEWS, elevation_deg=20.0, distance=1.3, fovy_deg=50.0)


def test_a_cube_shows_a_few_flat_colours_a_lumpy_sphere_many():
    cube = _colours_per_view(render_normals(_cube(), _cams(), RES, torch.device("cpu")))
    assert all(1 <= n <= 3 for n in cube)       # at most three faces seen at once, each one colour
    sphere = _sphere()
    rng = np.random.default_rng(0)
    lumpy = MeshData(sphere.vertices * (1 + 0.08 * rng.random((len(sphere.vertices), 1))).astype(np.float32),
                     sphere.faces, uvs=sphere.uvs, texture=sphere.texture)
    lumps = _colours_per_view(render_normals(lumpy, _cams(), RES, torch.device("cpu")))
    assert min(lumps) > 50


def test_normal_colours_are_world_directions():
    img = render_normals(_cube(), orbit(1, elevation_deg=89.0, distance=1.3, fovy_deg=50.0), RES, torch.device("cpu"))
    centre = img[0, :, RES // 2, RES // 2]
    # Looking down: the top face's normal +Z maps to (0.5, 0.5, 1.0).
    assert torch.allclose(centre, torch.tensor([0.5, 0.5, 1.0]), atol=1 / 255)


def test_the_turntable_has_the_albedo_row_then_the_normal_row():
    cube = _cube()
    grid = turntable_image(cube, RES, torch.device("cpu"))
    assert grid.shape == (2 * RES, TURNTABLE_VIEWS * RES, 3)
    cams = orbit(TURNTABLE_VIEWS, elevation_deg=20.0, distance=turntable_distance(cube), fovy_deg=TURNTABLE_FOVY)
    albedo = (render_asset(cube, cams, RES, torch.device("cpu"))[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    normals = (render_normals(cube, cams, RES, torch.device("cpu"))[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(grid[:RES, :RES], albedo) and np.array_equal(grid[RES:, :RES], normals)
