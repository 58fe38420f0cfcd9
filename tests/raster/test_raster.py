"""The rasteriser: depth test, exact interpolation, gradients, silhouette gradients, backends."""

import math

import pytest
import torch
import trimesh

from dreamflow import accel
from dreamflow.render.raster import (antialias, interpolate, rasterize, render_mesh, to_clip,
                                     vertex_normals)
from dreamflow.scene.cameras import Cameras, orbit


# The CUDA twin is listed everywhere and shows as skipped, with the reason, where it cannot run.
BACKENDS = ["torch", pytest.param("nvdiffrast", marks=pytest.mark.skipif(
    accel.nvdiffrast("cuda") is None, reason="needs CUDA (nvdiffrast on a CUDA device)"))]
DEVICE = {"torch": "cpu", "nvdiffrast": "cuda"}


def _quad(z: float, half: float = 0.3):
    v = torch.tensor([[-half, z, -half], [half, z, -half], [half, z, half], [-half, z, half]])
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_depth_test_keeps_the_nearest_surface_whatever_the_face_order():
    near_v, near_f = _quad(-0.2, 0.2)       # front camera stands on -Y: smaller y is nearer
    far_v, far_f = _quad(0.2, 0.4)
    cams = Cameras.make(0.0, 0.0, 1.5, 50.0)
    for order in ("near_first", "far_first"):
        if order == "near_first":
            v = torch.cat([near_v, far_v]); f = torch.cat([near_f, far_f + 4]); near_ids = {0, 1}
        else:
            v = torch.cat([far_v, near_v]); f = torch.cat([far_f, near_f + 4]); near_ids = {2, 3}
        r = rasterize(v, f, 32, cameras=cams, backend="torch")
        centre = int(r.triangle_id[0, 16, 16])
        assert centre in near_ids, order
        corner = int(r.triangle_id[0, 9, 9])
        assert corner >= 0 and corner not in near_ids, order
        assert int(r.triangle_id[0, 0, 0]) == -1


def test_interpolated_positions_lie_on_the_surface_seen_through_each_pixel():
    v, f = _quad(0.1, 0.4)
    v = v + torch.tensor([0.0, 0.0, 0.05]) * v[:, :1]   # tilt it a little
    cams = Cameras.make(20.0, 10.0, 1.3, 45.0)
    r = rasterize(v, f, 24, cameras=cams, backend="torch")
    pos = interpolate(v, r)[0]
    o, d = cams.rays(24, 24)
    n = torch.linalg.cross(v[1] - v[0], v[2] - v[0]); n = n / n.norm()
    t = ((v[0] - o[0]) @ n) / (d[0] @ n)
    hit = o[0] + t[..., None] * d[0]
    m = r.mask[0]
    assert m.sum() > 50
    assert torch.allclose(pos[m], hit[m], atol=1e-4)


def _small_scene(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    # Two triangles sharing an edge plus one in front, in clip space with varying w (perspective).
    xy = torch.tensor([[-0.7, -0.6], [0.6, -0.5], [0.1, 0.7], [-0.5, 0.52], [-0.2, -0.2], [0.5, 0.1], [0.0, 0.45]])
    w = 1.0 + 0.3 * torch.rand(7, generator=g)
    z = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    clip = torch.cat([xy * w[:, None], (z * w)[:, None], w[:, None]], 1).to(dtype)[None]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    attr = torch.rand(7, 3, generator=g, dtype=dtype)
    return clip, faces, attr


def _image(clip, faces, attr, weights):
    r = rasterize(clip, faces, 12, backend="torch")
    col = interpolate(attr, r)
    mask = r.mask.unsqueeze(-1).to(clip.dtype)
    col = torch.cat([col * mask + 0.25 * (1 - mask), mask], -1)
    return (antialias(col, r) * weights).sum()


def test_gradients_match_finite_differences_for_positions_and_attributes():
    clip, faces, attr = _small_scene()
    weights = torch.rand(1, 12, 12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    clip.requires_grad_(True); attr.requires_grad_(True)
    _image(clip, faces, attr, weights).backward()
    eps = 1e-6
    checked_pos = 0
    with torch.no_grad():
        for vi in range(7):
            for c in (0, 1, 3):
                p = clip.detach().clone(); p[0, vi, c] += eps
                m = clip.detach().clone(); m[0, vi, c] -= eps
                fd = (_image(p, faces, attr, weights) - _image(m, faces, attr, weights)) / (2 * eps)
                assert float(fd) == pytest.approx(float(clip.grad[0, vi, c]), rel=1e-4, abs=1e-6), (vi, c)
                checked_pos += abs(float(fd)) > 1e-3
            for c in range(3):
                p = attr.detach().clone(); p[vi, c] += eps
                m = attr.detach().clone(); m[vi, c] -= eps
                fd = (_image(clip, faces, p, weights) - _image(clip, faces, m, weights)) / (2 * eps)
                assert float(fd) == pytest.approx(float(attr.grad[vi, c]), rel=1e-4, abs=1e-6)
    assert checked_pos >= 10   # the position gradients are not trivially zero


def test_antialiased_coverage_gradient_is_the_area_derivative_at_silhouettes():
    # One large screen-space triangle: sum of coverage ~ its area in pixels, and moving a vertex
    # changes it by half the opposite edge's length times the normal displacement.
    H = 64
    tri = torch.tensor([[-0.62, -0.55], [0.71, -0.43], [0.05, 0.66]], dtype=torch.float64, requires_grad=True)
    clip = torch.cat([tri, torch.zeros(3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)], 1)[None]
    faces = torch.tensor([[0, 1, 2]])
    r = rasterize(clip, faces, H, backend="torch")
    alpha = antialias(r.mask.unsqueeze(-1).double(), r)
    alpha.sum().backward()
    px = tri.detach() * (H / 2)    # NDC -> pixels (y flipped does not change the magnitude)
    area = 0.5 * abs(float((px[1, 0] - px[0, 0]) * (px[2, 1] - px[0, 1]) - (px[2, 0] - px[0, 0]) * (px[1, 1] - px[0, 1])))
    assert float(alpha.detach().sum()) == pytest.approx(area, rel=0.01)
    assert float(r.mask.sum()) != pytest.approx(float(alpha.detach().sum()), rel=1e-6)
    # d(area)/d(vertex 2, y) in NDC units: (x1 - x0) / 2 in pixels times H/2 pixels per NDC unit.
    expected = 0.5 * float(px[1, 0] - px[0, 0]) * (H / 2)
    assert float(tri.grad[2, 1]) == pytest.approx(expected, rel=0.1)
    expected_x = 0.5 * float(px[0, 1] - px[1, 1]) * (H / 2)
    assert float(tri.grad[2, 0]) == pytest.approx(expected_x, rel=0.2, abs=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_renders_an_analytic_sphere(backend):
    dev = DEVICE[backend]
    m = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    v = torch.tensor(m.vertices, dtype=torch.float32, device=dev)
    f = torch.tensor(m.faces, device=dev)
    cams = orbit(3, device=dev)
    out = render_mesh(v, f, cams, 96, mode="normal", backend=backend)
    # Coverage: the sphere's projected disc, (tan(asin(r/d)) / tan(fov/2))^2 * pi / 4 of the image.
    frac = math.pi * (math.tan(math.asin(0.4 / 1.2)) / math.tan(math.radians(25.0))) ** 2 / 4
    assert float(out.alpha.mean()) == pytest.approx(frac, rel=0.02)
    # Normals equal the direction from the centre to the surface point seen through each pixel.
    o, d = cams.rays(96, 96)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.4 ** 2)
    hit = disc > 0.05          # away from the silhouette
    t = -b - disc.clamp(min=0).sqrt()
    n_true = torch.nn.functional.normalize(o + t[..., None] * d, dim=-1)
    n_img = out.normals.permute(0, 2, 3, 1)
    inside = hit & out.rast.mask
    cos = (n_img[inside] * n_true[inside]).sum(-1)
    assert float(cos.mean()) > 0.999
    if backend != "torch":
        ref = render_mesh(v.cpu(), f.cpu(), cams.to("cpu"), 96, mode="normal", backend="torch")
        agree = (out.rast.triangle_id.cpu() == ref.rast.triangle_id).float().mean()
        assert float(agree) > 0.99
        assert torch.allclose(out.image.cpu(), ref.image, atol=0.05)


def test_textured_render_samples_the_uv_map_with_v_up():
    v, f = _quad(0.0, 0.4)
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tex = torch.zeros(8, 8, 3); tex[:4, :, 0] = 1.0; tex[4:, :, 2] = 1.0     # top half red, bottom blue
    out = render_mesh(v, f, Cameras.make(0.0, 0.0, 1.2, 50.0), 32, uvs=uvs, texture=tex, background=0.0)
    top, bottom = out.image[0, :, 10, 16], out.image[0, :, 22, 16]
    assert top[0] > 0.9 and top[2] < 0.1
    assert bottom[2] > 0.9 and bottom[0] < 0.1


def test_vertex_normals_point_outwards_on_a_closed_mesh():
    m = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    v = torch.tensor(m.vertices, dtype=torch.float32)
    n = vertex_normals(v, torch.tensor(m.faces))
    assert float((n * v).sum(-1).min()) > 0.98
