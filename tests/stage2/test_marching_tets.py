"""Marching tetrahedra on the generated grid: an analytic sphere, mesh hygiene, gradients."""

import math

import numpy as np
import pytest
import torch
import trimesh

from dreamflow.scene.dmtet import DMTet, laplacian_smoothness, normal_consistency, sdf_from_mesh
from dreamflow.scene.tets import make_tet_grid, marching_tets


def test_grid_is_conforming_with_positive_tetrahedra():
    g = make_tet_grid(3)
    assert g.vertices.shape == (64, 3) and g.tets.shape == (6 * 27, 4)
    v = g.vertices[g.tets]
    vol = torch.linalg.det(torch.stack([v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], v[:, 3] - v[:, 0]], 1))
    assert bool((vol > 0).all())
    assert float(vol.sum()) / 6.0 == pytest.approx((g.hi - g.lo) ** 3, rel=1e-5)
    # Conforming: every interior triangle is shared by exactly two tetrahedra, boundary ones by one.
    faces = torch.cat([g.tets[:, [0, 1, 2]], g.tets[:, [0, 1, 3]], g.tets[:, [0, 2, 3]], g.tets[:, [1, 2, 3]]])
    _, counts = torch.unique(torch.sort(faces, 1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert int((counts == 1).sum()) == 6 * 2 * 9     # two triangles per boundary square


@pytest.mark.parametrize("resolution", [24, 40])
def test_sphere_area_volume_and_mesh_hygiene(resolution):
    r = 0.35
    grid = make_tet_grid(resolution)
    v, f = marching_tets(grid.vertices, grid.tets, grid.vertices.norm(dim=-1) - r)
    vn, fn = v.numpy(), f.numpy()
    assert fn.min() >= 0 and fn.max() < len(vn)
    tm = trimesh.Trimesh(vn, fn, process=False)
    area = np.linalg.norm(np.cross(vn[fn[:, 1]] - vn[fn[:, 0]], vn[fn[:, 2]] - vn[fn[:, 0]]), axis=1) / 2
    assert area.min() > 0.0                                      # no degenerate triangles
    assert len(np.unique(np.sort(fn, axis=1), axis=0)) == len(fn)  # no duplicated faces
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0                                         # outward orientation
    tol = 0.03 if resolution == 24 else 0.01
    assert tm.area == pytest.approx(4 * math.pi * r * r, rel=tol)
    assert tm.volume == pytest.approx(4 / 3 * math.pi * r ** 3, rel=tol)
    assert np.abs(np.linalg.norm(vn, axis=1) - r).max() < 0.3 * grid.spacing


def test_surface_moves_with_the_sdf_volume_derivative_is_the_area():
    grid = make_tet_grid(32)
    shift = torch.zeros((), requires_grad=True)
    v, f = marching_tets(grid.vertices, grid.tets, grid.vertices.norm(dim=-1) - 0.3 - shift)
    p = v[f]
    volume = (p[:, 0] * torch.linalg.cross(p[:, 1], p[:, 2], dim=-1)).sum() / 6.0
    volume.backward()
    area = 0.5 * torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1).norm(dim=-1).sum()
    assert float(shift.grad) == pytest.approx(float(area.detach()), rel=0.02)


def test_dmtet_from_a_mesh_sdf_rebuilds_the_mesh_and_regularisers_are_finite():
    box = trimesh.creation.box(extents=(0.6, 0.4, 0.5))
    d = DMTet(32)
    d.set_sdf(sdf_from_mesh(box.vertices, box.faces, d.grid))
    v, f = d.mesh()
    tm = trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False)
    assert tm.is_watertight
    assert tm.volume == pytest.approx(0.6 * 0.4 * 0.5, rel=0.05)
    nc, lap = normal_consistency(v, f), laplacian_smoothness(v, f)
    (nc + lap).backward()
    assert torch.isfinite(d.sdf.grad).all() and float(d.sdf.grad.abs().sum()) > 0


def test_mesh_sdf_is_the_distance_near_the_surface_and_only_the_sign_beyond_three_cells():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.35)
    grid = DMTet(40).grid
    sdf = sdf_from_mesh(sphere.vertices, sphere.faces, grid).double()
    exact = grid.vertices.double().norm(dim=-1) - 0.35
    band = 3.0 * grid.spacing
    near = exact.abs() < 0.8 * band
    # Near the surface: the distance to it, to within the spacing of the surface samples (about h/3).
    assert (sdf[near] - exact[near]).abs().max() < 0.5 * grid.spacing
    # Beyond the band: clamped, with the right side (inside negative), both inside and out.
    far = exact.abs() > 1.2 * band
    assert (far & (exact < 0)).any() and (far & (exact > 0)).any()
    assert torch.allclose(sdf[far], torch.sign(exact[far]) * band, rtol=0, atol=1e-6)
