"""Stage 2: DMTet geometry tuning on normal maps (2a), then a colour field on the fixed mesh (2b).

Both sub-stages are a :class:`~dreamflow.methods.loop.Problem` run by the one loop
(:class:`~dreamflow.methods.loop.Distillation`); this module only builds the problems and streams
the same events as stage 1 (field names of the wire protocol), with ``stage`` = ``"geometry"`` or
``"texture"``:

- ``progress`` every step: step, total, loss, t, elapsed, eta, stage_index, stage_count;
- ``preview`` every ``preview_every`` steps: step; arrays ``{"image": uint8 (H, W, 3)}``;
- ``mesh`` every ``mesh_every`` steps and once at the end (``final``): the mesh arrays, with UVs
  and a baked texture whenever there is a colour to bake;
- ``stage_done``: steps, seconds, report (metrics ``psnr_db`` and ``chamfer_rel`` against the
  reference object when the prior is one; score model used).

In 2a the prior sees normal maps, exactly as DreamFlow: ``D_phi(x) = x`` (identity score model)
and, for the reference-object prior, a reference that renders its own normal map at the same
cameras (so the exact denoiser stays exact).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..export.mesh import MeshData, MeshError
from ..methods.loop import Problem, Rendered, StepReport
from ..methods.registry import MethodConfig
from ..priors.base import Prior, ScoreModel
from ..render.raster import NORMAL_BACKGROUND, antialias, interpolate, rasterize, render_mesh, vertex_normals
from ..scene.cameras import Cameras
from ..scene.dmtet import DMTet, laplacian_smoothness, normal_consistency
from ..scene.texture_field import TextureField
from .components import build_score_model, get_prior
from .config import RefineStageConfig, TextureStageConfig
from .context import JobContext, StageRecord
from .metrics import evaluate_mesh as evaluate  # noqa: F401 (stage2.evaluate: the mesh stages' yardstick)
from .stage_loop import run_stage_loop

#: Where previews look from: a three-quarter front view, as a person would first look at an object.
PREVIEW_CAMERA = dict(azimuth_deg=30.0, elevation_deg=15.0, distance=1.3, fovy_deg=50.0)
#: Colour renders are composited over white (the reference prior renders over white too).
COLOUR_BACKGROUND = 1.0


# -- the problems ---------------------------------------------------------------------------------
class GeometryProblem(Problem):
    """2a: the DMTet surface rendered as a normal map; SDF and offsets are the parameters.

    The regularisers are weighted per pixel of the batch (``weight * B * H * W * value``), so their
    balance with the image loss, which sums over pixels, does not change with the resolution.
    """

    def __init__(self, dmtet: DMTet, resolution: int, lr: float, normal_consistency_weight: float,
                 laplacian_weight: float):
        self.dmtet = dmtet
        self.resolution = resolution
        self.lr = lr
        self.nc_weight = normal_consistency_weight
        self.lap_weight = laplacian_weight

    def param_groups(self) -> list[dict]:
        """SDF values and vertex offsets, one learning rate."""
        return [{"params": [self.dmtet.sdf, self.dmtet.deform], "lr": self.lr}]

    def render(self, cameras: Cameras | None) -> Rendered:
        """Normal maps of the current surface, with the smoothness regularisers."""
        v, f = self.dmtet.mesh()
        if f.shape[0] == 0:
            raise RuntimeError("the DMTet surface vanished (no SDF sign change left in the grid)")
        out = render_mesh(v, f, cameras, self.resolution, mode="normal", background=NORMAL_BACKGROUND)
        pixels = len(cameras) * self.resolution * self.resolution
        reg = pixels * (self.nc_weight * normal_consistency(v, f) + self.lap_weight * laplacian_smoothness(v, f))
        return Rendered(out.image, out.alpha, reg)

    def state_dict(self) -> dict:
        """SDF and offsets."""
        return {k: t.detach().clone() for k, t in self.dmtet.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore SDF and offsets."""
        self.dmtet.load_state_dict(state)


class TextureProblem(Problem):
    """2b and 3: a colour field on a fixed mesh (optionally small per-vertex offsets, stage 3)."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, field: TextureField, resolution: int,
                 lr_grid: float, lr_mlp: float, lr_geometry: float = 0.0, background: float = COLOUR_BACKGROUND):
        self.base_vertices = vertices.detach()
        self.faces = faces
        self.field = field
        self.resolution = resolution
        self.lr_grid, self.lr_mlp, self.lr_geometry = lr_grid, lr_mlp, lr_geometry
        self.background = background
        self.offsets = torch.nn.Parameter(torch.zeros_like(self.base_vertices)) if lr_geometry > 0 else None

    def vertices(self) -> torch.Tensor:
        """Current vertex positions."""
        return self.base_vertices if self.offsets is None else self.base_vertices + self.offsets

    def param_groups(self) -> list[dict]:
        """Hash grid, MLP and (stage 3, optional) vertex offsets."""
        groups = [{"params": self.field.grid_parameters(), "lr": self.lr_grid},
                  {"params": self.field.mlp_parameters(), "lr": self.lr_mlp}]
        if self.offsets is not None:
            groups.append({"params": [self.offsets], "lr": self.lr_geometry})
        return groups

    def render(self, cameras: Cameras | None) -> Rendered:
        """Colour renders: the field at the rasterised surface points, over the background."""
        return Rendered(*render_field(self.vertices(), self.faces, self.field, cameras, self.resolution, self.background))

    def state_dict(self) -> dict:
        """Field (and offsets)."""
        state = {"field": {k: t.detach().clone() for k, t in self.field.state_dict().items()}}
        if self.offsets is not None:
            state["offsets"] = self.offsets.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore field (and offsets)."""
        self.field.load_state_dict(state["field"])
        if self.offsets is not None and "offsets" in state:
            with torch.no_grad():
                self.offsets.copy_(state["offsets"])


def render_field(vertices: torch.Tensor, faces: torch.Tensor, field: TextureField, cameras: Cameras,
                 resolution: int, background: float = COLOUR_BACKGROUND) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and coverage (B, 1, H, W) of a mesh coloured by a 3D colour field."""
    rast = rasterize(vertices, faces, resolution, cameras=cameras)
    pos = interpolate(vertices, rast)
    flat = torch.nonzero(rast.mask.reshape(-1)).squeeze(1)
    cols = field(pos.reshape(-1, 3)[flat])
    B, H, W = rast.triangle_id.shape
    colour = torch.full((B * H * W, 3), float(background), dtype=cols.dtype, device=cols.device).index_put((flat,), cols)
    mask = rast.mask.reshape(-1, 1).to(cols.dtype)
    both = antialias(torch.cat([colour, mask], dim=1).reshape(B, H, W, 4), rast)
    return both[..., :3].permute(0, 3, 1, 2).contiguous(), both[..., 3:].permute(0, 3, 1, 2).contiguous()


# -- priors and score models for a stage ------------------------------------------------------------
class _NormalMapRenderer:
    """The reference object's normal map at given cameras, rendered like the geometry stage's."""

    def __init__(self, reference: Any):
        self.reference = reference

    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal maps (B, 3, H, W) over NORMAL_BACKGROUND and coverage (B, 1, H, W)."""
        ref = self.reference
        width = height if width is None else width
        k = getattr(ref, "supersample", 1)
        out = render_mesh(ref.vertices, ref.faces, cameras.to(ref.device), (height * k, width * k), mode="normal",
                          background=NORMAL_BACKGROUND)
        image, alpha = out.image, out.alpha
        if k > 1:
            image, alpha = F.avg_pool2d(image, k), F.avg_pool2d(alpha, k)
        return image.clamp(0.0, 1.0), alpha


def geometry_prior(prior: Prior) -> Prior:
    """The prior 2a distils normal maps from: the same one, except that an exact reference-object
    prior must look at the reference's normal map (its data), not at its colours."""
    from ..priors.reference import ReferenceObjectPrior

    if isinstance(prior, ReferenceObjectPrior):
        return ReferenceObjectPrior(_NormalMapRenderer(prior.renderer), std=prior.std)
    return prior


def surface_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> MeshData:
    """Plain mesh data (positions, faces, vertex normals) from tensors."""
    v = vertices.detach()
    n = vertex_normals(v, faces)
    return MeshData(v.cpu().numpy().astype(np.float32), faces.cpu().numpy().astype(np.int32),
                    n.cpu().numpy().astype(np.float32))


def textured_mesh(vertices: torch.Tensor, faces: torch.Tensor, colour: Callable[[torch.Tensor], torch.Tensor],
                  texture_size: int, uvs: np.ndarray | None = None) -> MeshData:
    """Mesh data with UVs and a texture baked from a colour field.

    With ``uvs`` (per vertex, same vertex order) the texture is baked into that layout and the
    vertices and faces are kept exactly; without, the mesh is unwrapped (xatlas only duplicates
    vertices along seams: positions and face count stay the same).
    """
    from ..export.bake import bake_texture
    from ..export.unwrap import unwrap

    base = surface_mesh(vertices, faces)
    if uvs is not None:
        m = MeshData(base.vertices, base.faces, base.normals, np.asarray(uvs, dtype=np.float32))
    else:
        m = unwrap(base, texture_size=texture_size)
    with torch.no_grad():
        m.texture = bake_texture(m, lambda p: colour(p.to(vertices.device)), texture_size, device=vertices.device)
    return m


def new_texture_field(cfg: TextureStageConfig, device: torch.device, seed: int = 0) -> TextureField:
    """A fresh colour field with the stage's hash-grid settings."""
    return TextureField.create(cfg.grid, device=device, seed=seed)


# -- running a stage inside a job -------------------------------------------------------------------
GEOMETRY = "geometry"
TEXTURE = "texture"
def with_start(method: MethodConfig, start_t: float | None) -> MethodConfig:
    """The stage's method with its schedule starting no later than ``start_t`` (lower = closer to the input)."""
    if start_t is None:
        return method
    if not 0.0 < start_t <= 1.0:
        raise ValueError(f"start_t must lie in (0, 1], got {start_t}")
    sched = method.schedule
    t0 = min(sched.t_start, float(start_t))
    return replace(method, schedule=replace(sched, t_start=t0, t_end=min(sched.t_end, t0)))


def camera_seed(ctx: JobContext, stage: str) -> int:
    """Each mesh stage draws its own camera sequence (stage 1 uses the job's seed itself)."""
    return ctx.config.seed + sum(map(ord, stage))


def output_mesh(ctx: JobContext, mesh: MeshData) -> MeshData:
    """A mesh as the job sends it: back in the input's coordinates when the input was moved into the box."""
    frame = ctx.cache.get("input_frame")
    return mesh if frame is None else frame.from_box(mesh)


def incoming_metrics(ctx: JobContext) -> dict[str, float]:
    """The asset a stage starts from, measured like its result (``start_psnr_db``, ``start_chamfer_rel``),
    so that every stage's report shows what it changed with one yardstick."""
    if ctx.mesh is None or ctx.mesh.texture is None or ctx.mesh.uvs is None:
        return {}
    return {f"start_{k}": v for k, v in evaluate(ctx, ctx.mesh).items() if k in ("psnr_db", "chamfer_rel")}


def finish_stage(ctx: JobContext, stage: str, start: float, steps: int, mesh: MeshData,
                 history: list[StepReport], score_name: str, extra: dict[str, float] | None = None,
                 cpu_start: float | None = None) -> None:
    """Final mesh event, the stage's record and its ``stage_done`` event; the mesh becomes the job's asset."""
    ctx.emit("mesh", {"stage": stage, "step": steps, "final": True}, output_mesh(ctx, mesh).arrays())
    ctx.mesh = mesh
    metrics = evaluate(ctx, mesh)
    metrics.update(extra or {})
    if cpu_start is not None:
        metrics["cpu_seconds"] = time.process_time() - cpu_start
    seconds = time.perf_counter() - start
    ctx.stages[stage] = StageRecord(seconds, metrics, history)
    ctx.emit("stage_done", {"stage": stage, "steps": steps, "seconds": seconds,
                            "report": {"metrics": metrics, "score_model": score_name}})


def colour_source(ctx: JobContext) -> TextureField:
    """The colour field the mesh stages start from: the one a previous mesh stage tuned, else the
    stage-1 NeRF's colour network, else one fitted to a textured input mesh, else a fresh (grey) one."""
    from .refine_input import fit_field_to_texture

    if "colour_field" in ctx.cache:
        return ctx.cache["colour_field"]
    if ctx.nerf is not None:
        field = TextureField.from_nerf(ctx.nerf)
    else:
        field = new_texture_field(ctx.config.texture, ctx.device, ctx.config.seed)
        src = ctx.cache.get("input_box")
        if src is not None and src.texture is not None and src.uvs is not None:
            fit_field_to_texture(field, src, seed=ctx.config.seed)
    ctx.cache["colour_field"] = field
    return field


def initial_dmtet(ctx: JobContext, resolution: int) -> DMTet:
    """A DMTet grid whose SDF comes from the stage-1 density field, or else from the input mesh."""
    from ..scene.dmtet import sdf_from_density, sdf_from_mesh

    dmtet = DMTet(resolution, device=ctx.device)
    src = ctx.cache.get("input_box", ctx.mesh)
    sdf = None
    if ctx.nerf is not None:
        level = ctx.config.geometry.init_level
        if level <= 0:
            with torch.no_grad():
                level = float(torch.cat([ctx.nerf.density(p) for p in dmtet.grid.vertices.split(65536)]).mean())
        sdf = sdf_from_density(ctx.nerf.density, dmtet.grid, level)
    if (sdf is None or not ((sdf < 0).any() and (sdf > 0).any())) and src is not None:
        # A thin stage-1 shape can slip between the vertices of a coarse tet grid; its extracted
        # (finer, cleaned) mesh still says where the surface is.
        sdf = sdf_from_mesh(src.vertices, src.faces, dmtet.grid)
    if sdf is None:
        raise MeshError("geometry tuning needs the stage-1 NeRF or an input mesh to start from")
    if not ((sdf < 0).any() and (sdf > 0).any()):
        raise MeshError("the starting shape has no surface inside the tetrahedral grid (it is empty or fills the box)")
    dmtet.set_sdf(sdf)
    return dmtet


def run_geometry_stage(ctx: JobContext) -> None:
    """Stage 2a runner: DMTet from stage 1 (or the input mesh), tuned on normal maps with D_phi = x."""
    from ..export.extract import simplify

    cfg = ctx.config.geometry
    start, cpu_start = time.perf_counter(), time.process_time()
    before = incoming_metrics(ctx)
    prior = geometry_prior(get_prior(ctx))
    method_cfg = with_start(cfg.method, ctx.start_t)
    score_model, score_name = build_score_model(ctx, prior, method_cfg, GEOMETRY)
    cond = prior.condition(ctx.config.prompt, ctx.config.negative_prompt, method_cfg.guidance)
    dmtet = initial_dmtet(ctx, cfg.tet_resolution)
    problem = GeometryProblem(dmtet, cfg.resolution, cfg.lr, cfg.normal_consistency_weight, cfg.laplacian_weight)
    from_nerf = "colour_field" not in ctx.cache and ctx.nerf is not None
    colour = colour_source(ctx)
    if from_nerf:
        # Bake what the NeRF shows, as stage 1's own mesh does: the albedo at the surface is paler
        # (measured on the house: 2a's better surface baked 17.5 dB from albedo vs 18.4 for stage 1's).
        from .stage1 import seen_colour

        nerf = ctx.nerf
        colour = lambda p: seen_colour(nerf, p)  # noqa: E731
    pcam = Cameras.make(device=ctx.device, **PREVIEW_CAMERA)

    def preview() -> torch.Tensor:
        v, f = dmtet.mesh()
        return render_mesh(v.detach(), f, pcam, cfg.resolution, mode="normal", background=NORMAL_BACKGROUND).image

    def mesh() -> MeshData:
        # Live meshes while the shape changes are untextured: a UV unwrap of a 30k-face surface
        # costs seconds, the final one is unwrapped once and that layout serves stages 2b and 3.
        with torch.no_grad():
            v, f = dmtet.mesh()
        return surface_mesh(v, f)

    history = run_stage_loop(ctx, GEOMETRY, problem, method_cfg, cfg.steps, cfg.views_per_iteration, prior, score_model,
                             cond, cfg.cameras, camera_seed(ctx, GEOMETRY), cfg.preview_every, preview,
                             cfg.mesh_every, lambda: output_mesh(ctx, mesh()))
    with torch.no_grad():
        v, f = dmtet.mesh()
    surface = simplify(surface_mesh(v, f), ctx.config.export.face_budget)
    v = torch.as_tensor(surface.vertices, device=ctx.device)
    f = torch.as_tensor(surface.faces, device=ctx.device).long()
    ctx.cache["surface"] = (v, f, None)
    final = textured_mesh(v, f, colour, ctx.config.export.texture_size)
    ctx.cache["layout"] = final
    finish_stage(ctx, GEOMETRY, start, len(history), final, history, score_name, before, cpu_start)


def colour_stage_surface(ctx: JobContext) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """The fixed mesh of a colour stage: the tuned DMTet surface, else the input mesh exactly (with
    its UVs if it has them), else the current asset's surface (stage 1's mesh)."""
    if "surface" in ctx.cache:
        return ctx.cache["surface"]
    src = ctx.cache.get("input_box")
    if src is None:
        if ctx.mesh is None:
            raise MeshError("texture tuning needs a mesh: run stage 1 or 2a first, or send an input mesh")
        src = ctx.mesh
        uvs = None
    else:
        uvs = src.uvs
    v = torch.as_tensor(src.vertices, dtype=torch.float32, device=ctx.device)
    f = torch.as_tensor(src.faces, device=ctx.device).long()
    ctx.cache["surface"] = (v, f, uvs)
    return ctx.cache["surface"]


def run_colour_stage(ctx: JobContext, stage: str, cfg: TextureStageConfig | RefineStageConfig, prior: Prior,
                     score_model: ScoreModel, score_name: str, lr_geometry: float = 0.0) -> None:
    """2b and 3: tune the colour field on the fixed mesh and bake the result."""
    start, cpu_start = time.perf_counter(), time.process_time()
    before = incoming_metrics(ctx)
    method_cfg = with_start(cfg.method, ctx.start_t)
    cond = prior.condition(ctx.config.prompt, ctx.config.negative_prompt, method_cfg.guidance)
    v, f, uvs = colour_stage_surface(ctx)
    field = colour_source(ctx)
    problem = TextureProblem(v, f, field, cfg.resolution, cfg.lr_grid, cfg.lr_mlp, lr_geometry)
    pcam = Cameras.make(device=ctx.device, **PREVIEW_CAMERA)
    layout: dict[str, MeshData] = {}
    if "layout" in ctx.cache:
        layout["m"] = ctx.cache["layout"]
    tex_size = ctx.config.export.texture_size

    def preview() -> torch.Tensor:
        return render_field(problem.vertices().detach(), f, field, pcam, cfg.resolution)[0]

    def mesh(size: int | None = None) -> MeshData:
        from ..export.bake import bake_texture

        size = min(tex_size, 256) if size is None else size
        # The mesh is fixed (unless vertices move): unwrap once, then only re-bake the texture.
        if "m" not in layout or problem.offsets is not None:
            layout["m"] = textured_mesh(problem.vertices().detach(), f, field, size, uvs=uvs)
            return layout["m"]
        m = layout["m"]
        with torch.no_grad():
            tex = bake_texture(m, lambda p: field(p.to(ctx.device)), size, device=ctx.device)
        return MeshData(m.vertices, m.faces, m.normals, m.uvs, tex)

    history = run_stage_loop(ctx, stage, problem, method_cfg, cfg.steps, cfg.views_per_iteration, prior, score_model,
                             cond, cfg.cameras, camera_seed(ctx, stage), cfg.preview_every, preview,
                             cfg.mesh_every, lambda: output_mesh(ctx, mesh()))
    if problem.offsets is not None:
        ctx.cache["surface"] = (problem.vertices().detach(), f, uvs)
    final = mesh(tex_size)
    ctx.cache["layout"] = final
    finish_stage(ctx, stage, start, len(history), final, history, score_name, before, cpu_start)


def run_texture_stage(ctx: JobContext) -> None:
    """Stage 2b runner: the colour field on the fixed mesh, APFO with the stage's score model (LoRA)."""
    cfg = ctx.config.texture
    prior = get_prior(ctx)
    score_model, score_name = build_score_model(ctx, prior, cfg.method, TEXTURE)
    run_colour_stage(ctx, TEXTURE, cfg, prior, score_model, score_name)
