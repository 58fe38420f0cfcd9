"""Surface measures on analytic meshes: a clean primitive scores its ideal, a wrinkled one worse; a
scaled or yawed one is not worse on the scale-free, yaw-free measures but is on the raw extent."""

import math

import numpy as np
import pytest

from dreamflow.export.measures import (closest_points_on_triangles, colour_noise, half_extent, surface_area,
                                       surface_measures, surface_colours)
from dreamflow.export.mesh import MeshData


def _cube(half: float = 0.4, n: int = 12) -> MeshData:
    """A cube whose faces are n x n quad grids with shared (welded) vertices, so that it can be wrinkled."""
    verts, faces = [], []
    e = np.eye(3)
    for axis in range(3):
        for sign in (1.0, -1.0):
            u, v = e[(axis + 1) % 3], e[(axis + 2) % 3]
            s = np.linspace(-half, half, n + 1)
            grid = sign * half * e[axis] + s[:, None, None] * u + s[None, :, None] * v
            base = sum(len(x) for x in verts)
            verts.append(grid.reshape(-1, 3))
            idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1) + base
            a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
            faces += [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]
    uniq, inverse = np.unique(np.round(np.concatenate(verts), 9), axis=0, return_inverse=True)
    return MeshData(uniq.astype(np.float32), inverse.reshape(-1)[np.concatenate(faces)].astype(np.int32))


def _sphere(radius: float = 0.4, rings: int = 48, segments: int = 96) -> MeshData:
    theta = np.linspace(0, math.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    ring = np.stack([np.sin(theta)[:, None] * np.cos(phi), np.sin(theta)[:, None] * np.sin(phi),
                     np.cos(theta)[:, None] * np.ones_like(phi)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]) * radius
    faces = []
    for i in range(segments):
        j = (i + 1) % segments
        faces.append((0, 1 + i, 1 + j))
        for r in range(rings - 2):
            a, b = 1 + r * segments + i, 1 + r * segments + j
            faces += [(a, a + segments, b + segments), (a, b + segments, b)]
        last = 1 + (rings - 2) * segments
        faces.append((last + i, len(verts) - 1, last + j))
    return MeshData(verts.astype(np.float32), np.array(faces, np.int32))


def _wrinkled(mesh: MeshData, depth: float, seed: int = 0) -> MeshData:
    """The cube with random dents: each vertex inside a face pushed inwards by up to ``depth``.
    Edges stay put, so the bounding box (and the scale match) does not change."""
    v = mesh.vertices.astype(np.float64).copy()
    on_face = np.isclose(np.abs(v), np.abs(v).max())
    inside = on_face.sum(1) == 1
    axis = on_face.argmax(1)
    rows = np.nonzero(inside)[0]
    dent = np.random.default_rng(seed).uniform(0, depth, size=len(rows))
    v[rows, axis[rows]] -= np.sign(v[rows, axis[rows]]) * dent
    return MeshData(v.astype(np.float32), mesh.faces)


def _yawed(mesh: MeshData, degrees: float, scale: float = 1.0, shift=(0.0, 0.0, 0.0)) -> MeshData:
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    return MeshData((mesh.vertices @ rot.T * scale + np.array(shift)).astype(np.float32), mesh.faces)


@pytest.fixture(scope="module")
def cube():
    return _cube()


@pytest.fixture(scope="module")
def clean(cube):
    return surface_measures(cube, cube)


def test_a_clean_cube_scores_its_ideal(clean):
    assert clean["normal_consistency"] > 0.985
    assert clean["area_ratio"] == pytest.approx(1.0, abs=0.01) and clean["area_ratio_raw"] == pytest.approx(1.0, abs=0.01)
    assert clean["chamfer_aligned"] < 0.01       # the floor of two independent surface samplings
    assert clean["half_extent"] == pytest.approx(0.4) and clean["true_half_extent"] == pytest.approx(0.4)


def test_a_sphere_judged_as_a_cube_is_less_a_cube(cube):
    r = surface_measures(_sphere(), cube)
    assert 0.80 < r["normal_consistency"] < 0.86     # the design note's independent figure: 0.832
    assert r["area_ratio"] == pytest.approx(4 * math.pi / 24, abs=0.02)   # sphere area over cube area, same diagonal
    assert r["chamfer_aligned"] > 0.05


def test_a_wrinkled_cube_scores_worse_on_every_surface_measure(cube, clean):
    r = surface_measures(_wrinkled(_cube(n=24), 0.05), cube)
    assert r["normal_consistency"] < clean["normal_consistency"] - 0.05
    assert r["area_ratio"] > 1.05 and r["area_ratio_raw"] > 1.05
    assert r["chamfer_aligned"] > clean["chamfer_aligned"] * 1.5


def test_a_scaled_turned_shifted_cube_is_not_worse_scale_and_yaw_free_but_is_raw(cube, clean):
    r = surface_measures(_yawed(cube, 30.0, scale=1.5, shift=(0.2, -0.1, 0.05)), cube)
    assert r["normal_consistency"] > 0.985 and r["chamfer_aligned"] < 0.01
    assert r["area_ratio"] == pytest.approx(1.0, abs=0.01)
    assert r["area_ratio_raw"] == pytest.approx(2.25, abs=0.03)
    assert r["half_extent"] > 1.5 * 0.4 * 1.2       # turned and scaled: the raw extent shows it
    assert (r["yaw_deg"] + 30.0) % 90.0 == pytest.approx(0.0, abs=1.0) or (r["yaw_deg"] + 30.0) % 90.0 > 89.0


def test_a_turned_cube_alone_is_worse_only_on_its_raw_extent(cube):
    r = surface_measures(_yawed(cube, 45.0), cube)
    assert r["normal_consistency"] > 0.985 and r["area_ratio"] == pytest.approx(1.0, abs=0.01)
    assert r["half_extent"] == pytest.approx(0.4 * math.sqrt(2), abs=1e-3)


def test_area_and_extent_of_a_box():
    cube = _cube(0.5, 3)
    assert surface_area(cube) == pytest.approx(6.0) and half_extent(cube) == pytest.approx(0.5)


def test_closest_points_on_triangles_match_a_dense_search():
    rng = np.random.default_rng(3)
    tri = rng.normal(size=(3, 3))
    points = rng.normal(size=(400, 3)) * 2
    closest = closest_points_on_triangles(points, *(np.repeat(tri[i:i + 1], len(points), 0) for i in range(3)))
    w = rng.dirichlet(np.ones(3), size=200000)
    dense = w @ tri
    from scipy.spatial import cKDTree

    best = cKDTree(dense).query(points)[0]
    exact = np.linalg.norm(closest - points, axis=1)
    assert np.all(exact <= best + 1e-9) and np.all(best - exact < 0.02)
    # The closest point lies on the triangle: non-negative barycentrics that sum to 1.
    edges = np.stack([tri[1] - tri[0], tri[2] - tri[0]], 1)                    # (3, 2)
    st, residual = np.linalg.lstsq(edges, (closest - tri[0]).T, rcond=None)[:2]
    assert np.all(residual < 1e-12) and np.all(st > -1e-9) and np.all(st.sum(0) < 1 + 1e-9)


def _textured_plane(texture: np.ndarray, n: int = 20) -> MeshData:
    s = np.linspace(0, 1, n + 1)
    uv = np.stack(np.meshgrid(s, s, indexing="ij"), -1).reshape(-1, 2)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    verts = np.c_[uv - 0.5, np.zeros(len(uv))]
    return MeshData(verts.astype(np.float32), faces.astype(np.int32), uvs=uv.astype(np.float32), texture=texture)


def test_colour_noise_is_zero_for_flat_colour_and_high_for_speckle():
    flat = np.full((128, 128, 3), (200, 30, 30), np.uint8)
    speckle = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3)).astype(np.uint8)
    assert colour_noise(_textured_plane(flat), count=5000) < 0.01
    assert colour_noise(_textured_plane(speckle), count=5000) > 20.0
    # A smooth gradient is not noise: its local mean is its own colour.
    ramp = np.repeat(np.linspace(0, 255, 128)[None, :, None], 128, 0).repeat(3, 2).astype(np.uint8)
    assert colour_noise(_textured_plane(ramp), count=5000) < 2.0


def test_surface_colours_read_the_texture_with_v_up():
    tex = np.zeros((64, 64, 3), np.uint8)
    tex[:32] = (255, 0, 0)    # top rows: v near 1
    tex[32:] = (0, 0, 255)
    plane = _textured_plane(tex)
    # Two samples: one on a face near v = 1, one near v = 0 (barycentric weights on each face's corners).
    uv_centres = plane.uvs[plane.faces].mean(1)
    top, bottom = int(np.argmax(uv_centres[:, 1])), int(np.argmin(uv_centres[:, 1]))
    colours = surface_colours(plane, np.array([top, bottom]), np.full((2, 3), 1 / 3))
    assert np.allclose(colours[0], (1, 0, 0)) and np.allclose(colours[1], (0, 0, 1))
