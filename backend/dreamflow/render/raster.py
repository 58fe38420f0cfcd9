"""Differentiable triangle rasterisation: nvdiffrast on CUDA when installed, pure PyTorch otherwise.

Both backends share one API and one convention: clip-space vertices ``(B, V, 4)`` (world vertices
times ``Cameras.mvp()`` transposed), image row 0 at the top (the project's image convention; the
nvdiffrast path flips clip-space y so that its bottom-up rows come out top-down), triangle ids
``-1`` on the background, perspective-correct barycentrics and NDC depth ``z / w``.

The pure-PyTorch rasteriser works in two passes:

1. *Coverage* (no gradients): every triangle's pixel bounding box is expanded into (triangle,
   pixel) pairs with ``repeat_interleave`` (no per-pixel Python loop), tested with edge
   functions at the pixel centre, and resolved by a z-buffer (``scatter_reduce`` amin of depth,
   ties broken by the larger triangle id). Pairs are processed in chunks to bound memory.
2. *Barycentrics* (differentiable): for each covered pixel the winning triangle's screen-space
   barycentrics are recomputed from the clip-space vertices with autograd on, then made
   perspective-correct. Interpolated attributes therefore carry gradients to the attributes and
   to the vertex positions.

Silhouette gradients (``antialias``) use analytic edge blending, the idea of nvdiffrast's
antialiasing operation: for every horizontally or vertically adjacent pixel pair whose triangle
ids differ, take the front triangle ``A`` (the covered pixel, or the nearer one), find where the
segment between the two pixel centres leaves ``A`` (edge functions are linear in screen space, so
the crossing ``t`` in [0, 1] is a ratio of two edge-function values), and if that edge is a
silhouette edge (a boundary edge, or one whose two faces face opposite ways in this view) blend:
``t > 1/2`` means ``A`` reaches into the outer pixel, which receives ``(t - 1/2)`` of ``A``'s
colour; ``t < 1/2`` means ``A`` does not reach the pixel boundary, and the inner pixel receives
``(1/2 - t)`` of the outer colour. The result is continuous as an edge sweeps over a pixel
centre, and ``t`` is differentiable in the edge's vertex positions, which is what gives geometry
gradients at silhouettes. Triangles with a vertex at or behind the camera plane (``w <= 0``) are
culled rather than clipped: every camera in this project sits outside the object's box.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from .. import accel
from ..geometry import vertex_normals  # noqa: F401 (render.raster.vertex_normals: the one formula)
from ..scene.cameras import Cameras

Backend = Literal["auto", "torch", "nvdiffrast"]

#: Background of normal-map renders (stage 2a and the reference prior's normal maps). Mid grey is
#: "no normal" and differs by at least 0.29 in some channel from every normal colour, so
#: silhouettes always have contrast.
NORMAL_BACKGROUND = 0.5

#: (triangle, pixel) pairs handled at once by the pure-PyTorch coverage pass.
_CHUNK_PAIRS = 1 << 22
_W_EPS = 1e-8


@dataclass
class RasterOut:
    """What rasterisation found at each pixel of a (B, H, W) batch."""

    triangle_id: torch.Tensor      # (B, H, W) int64, -1 where no triangle covers the pixel
    barycentrics: torch.Tensor     # (B, H, W, 3) perspective-correct, differentiable in the vertices
    depth: torch.Tensor            # (B, H, W) NDC depth z / w, 0 on the background
    verts_clip: torch.Tensor       # (B, V, 4) the clip-space vertices that were rasterised
    faces: torch.Tensor            # (F, 3) int64
    backend: str                   # "torch" or "nvdiffrast"
    native: torch.Tensor | None = None  # nvdiffrast's (B, H, W, 4) output, for its interpolate/antialias
    native_pos: torch.Tensor | None = None  # the y-flipped clip positions nvdiffrast saw

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool, True where a triangle covers the pixel."""
        return self.triangle_id >= 0


def choose_backend(device: torch.device | str, backend: Backend = "auto") -> ModuleType | None:
    """The nvdiffrast module when ``backend`` allows it and it is usable on ``device``, else None."""
    if backend == "torch":
        return None
    dr = accel.nvdiffrast(device)
    if backend == "nvdiffrast" and dr is None:
        raise RuntimeError("nvdiffrast was requested but is not available (needs CUDA and the nvdiffrast package)")
    return dr


_CONTEXTS: dict[str, object] = {}


def _context(dr, device: torch.device):
    key = str(device)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = dr.RasterizeCudaContext(device=device)
    return _CONTEXTS[key]


def to_clip(vertices: torch.Tensor, cameras: Cameras, near: float = 0.01, far: float = 10.0) -> torch.Tensor:
    """World vertices (V, 3) or (B, V, 3) to clip space (B, V, 4) for ``cameras``."""
    mvp = cameras.mvp(near, far).to(vertices.device, vertices.dtype)
    if vertices.ndim == 2:
        vertices = vertices.unsqueeze(0).expand(len(cameras), -1, -1)
    homo = torch.cat([vertices, torch.ones_like(vertices[..., :1])], dim=-1)
    return homo @ mvp.transpose(1, 2)


def _screen(verts_clip: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel coordinates (x right, y down; pixel centres at +0.5), NDC z and w of clip vertices."""
    w = verts_clip[..., 3]
    safe_w = torch.where(w.abs() > _W_EPS, w, torch.full_like(w, _W_EPS))
    x = (verts_clip[..., 0] / safe_w + 1.0) * (0.5 * width)
    y = (1.0 - verts_clip[..., 1] / safe_w) * (0.5 * height)
    z = verts_clip[..., 2] / safe_w
    return x, y, z, w


def _coverage(vx: torch.Tensor, vy: torch.Tensor, vz: torch.Tensor, vw: torch.Tensor, faces: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """Winning triangle per pixel (H*W,) for one view, -1 on the background; no gradients."""
    dev = vx.device
    fx, fy, fz, fw = vx[faces], vy[faces], vz[faces], vw[faces]          # (F, 3)
    area = (fx[:, 1] - fx[:, 0]) * (fy[:, 2] - fy[:, 0]) - (fx[:, 2] - fx[:, 0]) * (fy[:, 1] - fy[:, 0])
    valid = (fw > _W_EPS).all(1) & (area.abs() > 1e-12) & torch.isfinite(fx).all(1) & torch.isfinite(fy).all(1)
    # Pixel (i, j) has its centre at (j + 0.5, i + 0.5): columns ceil(min - 0.5) .. floor(max - 0.5).
    j0 = torch.ceil(fx.min(1).values - 0.5).clamp(0, width)
    j1 = torch.floor(fx.max(1).values - 0.5).clamp(-1, width - 1)
    i0 = torch.ceil(fy.min(1).values - 0.5).clamp(0, height)
    i1 = torch.floor(fy.max(1).values - 0.5).clamp(-1, height - 1)
    bw = (j1 - j0 + 1).clamp(min=0)
    bh = (i1 - i0 + 1).clamp(min=0)
    bw = torch.where(valid, bw, torch.zeros_like(bw)).long()
    bh = torch.where(valid, bh, torch.zeros_like(bh)).long()
    counts = bw * bh
    keep = torch.nonzero(counts > 0).squeeze(1)
    zbuf = torch.full((height * width,), float("inf"), device=dev, dtype=vx.dtype)
    tbuf = torch.full((height * width,), -1, device=dev, dtype=torch.long)
    if keep.numel() == 0:
        return tbuf
    csum = torch.cumsum(counts[keep], 0)
    start = 0
    while start < keep.numel():
        base = int(csum[start - 1]) if start > 0 else 0
        # Grow the chunk until it holds about _CHUNK_PAIRS pairs (at least one triangle).
        stop = int(torch.searchsorted(csum, torch.tensor(base + _CHUNK_PAIRS, device=dev), right=True))
        stop = max(stop, start + 1)
        tri = keep[start:stop]
        n = counts[tri]
        pair_tri = torch.repeat_interleave(tri, n)
        offsets = torch.cumsum(n, 0) - n
        local = torch.arange(int(n.sum()), device=dev) - torch.repeat_interleave(offsets, n)
        w_pair = bw[pair_tri]
        px = j0[pair_tri].long() + local % w_pair
        py = i0[pair_tri].long() + local // w_pair
        cx = px.to(vx.dtype) + 0.5
        cy = py.to(vx.dtype) + 0.5
        ax, ay = fx[pair_tri, 0], fy[pair_tri, 0]
        bx, by = fx[pair_tri, 1], fy[pair_tri, 1]
        qx, qy = fx[pair_tri, 2], fy[pair_tri, 2]
        a2 = area[pair_tri]
        l0 = ((bx - cx) * (qy - cy) - (qx - cx) * (by - cy)) / a2
        l1 = ((qx - cx) * (ay - cy) - (ax - cx) * (qy - cy)) / a2
        l2 = 1.0 - l0 - l1
        tol = -1e-7
        inside = (l0 >= tol) & (l1 >= tol) & (l2 >= tol)
        z = l0 * fz[pair_tri, 0] + l1 * fz[pair_tri, 1] + l2 * fz[pair_tri, 2]
        inside &= (z >= -1.0) & (z <= 1.0)
        pix = (py * width + px)[inside]
        z = z[inside]
        pair_tri = pair_tri[inside]
        if pix.numel():
            zc = torch.full_like(zbuf, float("inf")).scatter_reduce(0, pix, z, reduce="amin")
            win = z <= zc[pix]
            tc = torch.full_like(tbuf, -1).scatter_reduce(0, pix[win], pair_tri[win], reduce="amax")
            better = zc < zbuf
            zbuf = torch.where(better, zc, zbuf)
            tbuf = torch.where(better, tc, tbuf)
        start = stop
    return tbuf


def _rasterize_torch(verts_clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> RasterOut:
    B = verts_clip.shape[0]
    with torch.no_grad():
        vx, vy, vz, vw = _screen(verts_clip.detach(), height, width)
        tri = torch.stack([_coverage(vx[b], vy[b], vz[b], vw[b], faces, height, width) for b in range(B)])
        tri = tri.reshape(B, height, width)
    flat = torch.nonzero(tri.reshape(-1) >= 0).squeeze(1)
    b_idx = flat // (height * width)
    pix = flat % (height * width)
    t_idx = tri.reshape(-1)[flat]
    # Differentiable pass: recompute the winners' barycentrics from the clip vertices.
    vid = faces[t_idx]                                   # (P, 3)
    corners = verts_clip[b_idx[:, None], vid]            # (P, 3, 4)
    x, y, z, w = _screen(corners, height, width)
    cx = (pix % width).to(verts_clip.dtype) + 0.5
    cy = (pix // width).to(verts_clip.dtype) + 0.5
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    l0 = ((x[:, 1] - cx) * (y[:, 2] - cy) - (x[:, 2] - cx) * (y[:, 1] - cy)) / area
    l1 = ((x[:, 2] - cx) * (y[:, 0] - cy) - (x[:, 0] - cx) * (y[:, 2] - cy)) / area
    screen_bary = torch.stack([l0, l1, 1.0 - l0 - l1], dim=-1)
    persp = screen_bary / w
    persp = persp / persp.sum(-1, keepdim=True)
    depth_vals = (screen_bary * z).sum(-1)
    n_pix = B * height * width
    bary = torch.zeros(n_pix, 3, dtype=verts_clip.dtype, device=verts_clip.device).index_put((flat,), persp)
    depth = torch.zeros(n_pix, dtype=verts_clip.dtype, device=verts_clip.device).index_put((flat,), depth_vals)
    return RasterOut(tri, bary.reshape(B, height, width, 3), depth.reshape(B, height, width), verts_clip, faces, "torch")


def rasterize(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int | None = None,
              cameras: Cameras | None = None, backend: Backend = "auto") -> RasterOut:
    """Rasterise clip-space vertices (B, V, 4), or world vertices (V|B, V, 3) seen by ``cameras``."""
    width = height if width is None else width
    faces = faces.to(verts.device).long()
    if verts.shape[-1] == 3:
        if cameras is None:
            raise ValueError("world-space vertices need cameras; pass clip-space (B, V, 4) vertices otherwise")
        verts = to_clip(verts, cameras)
    if verts.ndim != 3 or verts.shape[-1] != 4:
        raise ValueError(f"expected clip-space vertices (B, V, 4), got {tuple(verts.shape)}")
    if faces.numel():
        # One read for both bounds (out-of-range indices would be an illegal access in nvdiffrast).
        lo, hi = torch.stack(torch.aminmax(faces)).tolist()
        if lo < 0 or hi >= verts.shape[1]:
            raise ValueError("face indices out of range")
    dr = choose_backend(verts.device, backend)
    if dr is None:
        return _rasterize_torch(verts, faces, height, width)
    # nvdiffrast's image rows run bottom-up: flip y (built on the device, no host copy).
    pos = torch.cat([verts[..., :1], -verts[..., 1:2], verts[..., 2:]], dim=-1).float().contiguous()
    tri32 = faces.int().contiguous()
    rast, _ = dr.rasterize(_context(dr, verts.device), pos, tri32, (height, width))
    u, v = rast[..., 0], rast[..., 1]
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * (rast[..., 3:4] > 0)
    return RasterOut(rast[..., 3].long() - 1, bary, rast[..., 2], verts, faces, "nvdiffrast", rast, pos)


def interpolate(attributes: torch.Tensor, rast: RasterOut) -> torch.Tensor:
    """Per-pixel attributes (B, H, W, C) from per-vertex ones (V, C) or (B, V, C); 0 on background."""
    if rast.native is not None:
        dr = accel.nvdiffrast(rast.native.device)
        out, _ = dr.interpolate(attributes.float().contiguous(), rast.native, rast.faces.int().contiguous())
        return out
    tri = rast.triangle_id
    B, H, W = tri.shape
    flat = torch.nonzero(tri.reshape(-1) >= 0).squeeze(1)
    vid = rast.faces[tri.reshape(-1)[flat]]                       # (P, 3)
    if attributes.ndim == 2:
        corner = attributes[vid]                                   # (P, 3, C)
    else:
        corner = attributes[(flat // (H * W))[:, None], vid]
    bary = rast.barycentrics.reshape(-1, 3)[flat]
    vals = (bary.unsqueeze(-1) * corner).sum(1)
    out = torch.zeros(B * H * W, attributes.shape[-1], dtype=vals.dtype, device=vals.device).index_put((flat,), vals)
    return out.reshape(B, H, W, -1)


def edge_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """(F, 3): the face across edge k (vertex k -> k+1) of each face, -1 for boundary/non-manifold edges."""
    F_ = faces.shape[0]
    e = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1).reshape(-1, 2)
    pair = torch.sort(e, dim=1).values
    # A scalar key per undirected edge: 1-D unique is far faster than unique over rows.
    key = pair[:, 0] * (int(faces.max()) + 1 if faces.numel() else 1) + pair[:, 1]
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    sorted_inv = inverse[order]
    nb = torch.full((3 * F_,), -1, dtype=torch.long, device=faces.device)
    two = counts[sorted_inv] == 2
    # Manifold edges appear as two consecutive entries after sorting by edge id.
    first = two & torch.cat([sorted_inv[1:] == sorted_inv[:-1], torch.zeros(1, dtype=torch.bool, device=faces.device)])
    a = order[first]
    b = order[torch.nonzero(first).squeeze(1) + 1]
    nb[a] = b // 3
    nb[b] = a // 3
    return nb.reshape(F_, 3)


def antialias(color: torch.Tensor, rast: RasterOut, neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """Blend colours (B, H, W, C) across silhouette edges so that vertex positions get gradients there."""
    if rast.native is not None:
        dr = accel.nvdiffrast(rast.native.device)
        return dr.antialias(color.float().contiguous(), rast.native, rast.native_pos, rast.faces.int().contiguous())
    B, H, W, C = color.shape
    faces = rast.faces
    nb = edge_neighbours(faces) if neighbours is None else neighbours
    x, y, _, w = _screen(rast.verts_clip, H, W)                   # (B, V) each, differentiable
    with torch.no_grad():
        fx, fy = x.detach()[:, faces], y.detach()[:, faces]        # (B, F, 3)
        facing = torch.sign((fx[..., 1] - fx[..., 0]) * (fy[..., 2] - fy[..., 0])
                            - (fx[..., 2] - fx[..., 0]) * (fy[..., 1] - fy[..., 0]))
    tri = rast.triangle_id
    depth = rast.depth
    flat_color = color.reshape(B * H * W, C)
    out = flat_color
    idx = torch.arange(B * H * W, device=color.device).reshape(B, H, W)
    for axis in (2, 1):
        if (W if axis == 2 else H) < 2:
            continue
        sl_p = (slice(None), slice(None), slice(0, -1)) if axis == 2 else (slice(None), slice(0, -1), slice(None))
        sl_q = (slice(None), slice(None), slice(1, None)) if axis == 2 else (slice(None), slice(1, None), slice(None))
        tp, tq = tri[sl_p].reshape(-1), tri[sl_q].reshape(-1)
        dp, dq = depth[sl_p].reshape(-1), depth[sl_q].reshape(-1)
        ip, iq = idx[sl_p].reshape(-1), idx[sl_q].reshape(-1)
        cand = tp != tq
        # The front triangle A: the covered pixel, or the nearer of two covered ones.
        p_front = (tq < 0) | ((tp >= 0) & (dp <= dq))
        cand &= (tp >= 0) | (tq >= 0)
        sel = torch.nonzero(cand).squeeze(1)
        if sel.numel() == 0:
            continue
        pf = p_front[sel]
        pin = torch.where(pf, ip[sel], iq[sel])
        pout = torch.where(pf, iq[sel], ip[sel])
        a_tri = torch.where(pf, tp[sel], tq[sel])
        b = pin // (H * W)
        vid = faces[a_tri]                                         # (P, 3)
        ex, ey = x[b[:, None], vid], y[b[:, None], vid]            # (P, 3) differentiable
        sgn = facing[b, a_tri]
        in_x = ((pin % (H * W)) % W).to(x.dtype) + 0.5
        in_y = ((pin % (H * W)) // W).to(x.dtype) + 0.5
        out_x = ((pout % (H * W)) % W).to(x.dtype) + 0.5
        out_y = ((pout % (H * W)) // W).to(x.dtype) + 0.5
        nx, ny = ex.roll(-1, dims=1), ey.roll(-1, dims=1)
        # Edge function of edge k (v_k -> v_k+1), positive inside A whatever its winding.
        def edge(px, py):
            return sgn[:, None] * ((nx - ex) * (py[:, None] - ey) - (ny - ey) * (px[:, None] - ex))
        e_in, e_out = edge(in_x, in_y), edge(out_x, out_y)
        with torch.no_grad():
            leaving = e_out < 0
            t_all = torch.where(leaving, e_in / (e_in - e_out).clamp(min=1e-12), torch.full_like(e_in, 2.0))
            k = t_all.argmin(1)
            ok = leaving.any(1)
            # Each edge is blended across one pair direction only, the one closer to its normal
            # (mostly vertical edges between horizontal neighbours), so no crossing counts twice.
            dx = (nx - ex).detach().gather(1, k[:, None]).squeeze(1).abs()
            dy = (ny - ey).detach().gather(1, k[:, None]).squeeze(1).abs()
            ok &= (dy >= dx) if axis == 2 else (dx > dy)
            ok &= (nb[a_tri, k] < 0) | (facing[b, nb[a_tri, k].clamp(min=0)] != sgn)
        rows = torch.nonzero(ok).squeeze(1)
        if rows.numel() == 0:
            continue
        kk = k[rows]
        ein = e_in[rows, kk]
        eout = e_out[rows, kk]
        t = (ein / (ein - eout)).clamp(0.0, 1.0)
        c_in, c_out = flat_color[pin[rows]], flat_color[pout[rows]]
        reach = (t - 0.5).clamp(min=0.0).unsqueeze(1)        # A covers part of the outer pixel
        short = (0.5 - t).clamp(min=0.0).unsqueeze(1)        # A leaves part of the inner pixel
        out = out.index_add(0, pout[rows], reach * (c_in - c_out))
        out = out.index_add(0, pin[rows], short * (c_out - c_in))
    return out.reshape(B, H, W, C)


@dataclass
class MeshRender:
    """Images of a mesh for a batch of cameras, channels first like the optimisation loop's renders."""

    image: torch.Tensor     # (B, 3, H, W) in [0, 1], composited over the background
    alpha: torch.Tensor     # (B, 1, H, W) antialiased coverage
    normals: torch.Tensor   # (B, 3, H, W) world-space unit normals, 0 on the background
    rast: RasterOut


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of an (H, W, C) texture (row 0 = top) at uv (..., 2) with v up; returns (..., C)."""
    shape = uv.shape[:-1]
    grid = torch.stack([uv[..., 0] * 2.0 - 1.0, 1.0 - uv[..., 1] * 2.0], dim=-1).reshape(1, -1, 1, 2)
    tex = texture.permute(2, 0, 1).unsqueeze(0).to(uv.dtype)
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0].transpose(0, 1).reshape(*shape, -1)


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras, resolution: int | tuple[int, int],
                vertex_colors: torch.Tensor | None = None, uvs: torch.Tensor | None = None,
                texture: torch.Tensor | None = None, background: float | torch.Tensor = 1.0,
                mode: Literal["color", "normal"] = "color", normals: torch.Tensor | None = None,
                aa: bool = True, backend: Backend = "auto") -> MeshRender:
    """Render a mesh: vertex colours, a UV-mapped texture, or (``mode="normal"``) its normal map.

    The normal map is ``(n + 1) / 2`` of the interpolated world-space vertex normals, the stage-2a
    geometry render; every caller (the geometry stage and the reference prior) uses this one
    function so that both sides see exactly the same image for the same mesh.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    faces = faces.to(vertices.device).long()
    rast = rasterize(vertices, faces, h, w, cameras=cameras, backend=backend)
    vn = vertex_normals(vertices, faces) if normals is None else normals
    n_img = F.normalize(interpolate(vn, rast), dim=-1, eps=1e-12)
    mask = rast.mask.unsqueeze(-1).to(vertices.dtype)
    if mode == "normal":
        color = (n_img + 1.0) * 0.5
    elif texture is not None:
        if uvs is None:
            raise ValueError("a texture needs per-vertex uvs")
        uv = interpolate(uvs.to(vertices.dtype), rast)
        color = sample_texture(texture, uv)[..., :3]
    elif vertex_colors is not None:
        color = interpolate(vertex_colors.to(vertices.dtype), rast)
    else:
        raise ValueError("render_mesh needs vertex_colors, uvs + texture, or mode='normal'")
    bg = torch.as_tensor(background, dtype=vertices.dtype, device=vertices.device)
    if bg.ndim == 4:   # a background image (B, 3, H, W)
        bg = bg.permute(0, 2, 3, 1)
    comp = color * mask + bg * (1.0 - mask)
    alpha = mask
    if aa:
        both = antialias(torch.cat([comp, mask], dim=-1), rast)
        comp, alpha = both[..., :3], both[..., 3:]
    return MeshRender(comp.permute(0, 3, 1, 2).contiguous(), alpha.permute(0, 3, 1, 2).contiguous(),
                      (n_img * mask).permute(0, 3, 1, 2).contiguous(), rast)
