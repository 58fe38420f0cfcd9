"""Stage 1: a NeRF from scratch, distilled from the prior with the configured method (APFO by default).

Events (all with ``stage = "stage1"``, field names as in the wire protocol's schema):

- ``progress`` every step: ``step`` (1-based), ``total``, ``loss``, ``t``, ``elapsed``, ``eta``
  (seconds), ``stage_index``, ``stage_count``;
- ``preview`` every ``preview_every`` steps: ``step``; arrays ``{"image": uint8 (H, W, 3)}``;
- ``mesh`` every ``mesh_every`` steps and once at the end with ``final = True``: ``step``,
  ``final``; arrays ``MeshData.arrays()`` (vertices, faces, normals, uvs, texture);
- ``stage_done`` at the end: ``steps``, ``seconds``, ``report`` (metrics, score model used).
"""

from __future__ import annotations

import torch

from ..export.extract import extract_textured_mesh
from ..export.mesh import MeshData
from ..methods.loop import Problem, Rendered, StepReport
from ..render.checkpointed import render_cameras_checkpointed
from ..render.volume import OccupancyGrid, render_cameras
from ..scene.cameras import Cameras
from ..scene.nerf import FieldSettings, NerfField
from .config import NerfStageConfig
from .context import JobContext
from .handoff import NerfResult
from .memory_plan import gpu_budget_bytes, plan_ray_chunk
from .metrics import evaluate_mesh, held_out_cameras, psnr
from .stage_loop import StageModels, StageRun, make_run, run_stage, stage_models, with_start

STAGE = "stage1"
#: The view shown in previews: front-right, slightly from above.
PREVIEW_VIEW = dict(azimuth_deg=30.0, elevation_deg=15.0, distance=1.2, fovy_deg=50.0)


def field_settings(cfg: NerfStageConfig) -> FieldSettings:
    """The NeRF field's shape from the stage settings."""
    return FieldSettings(grid=cfg.grid, mlp_width=cfg.mlp_width, density_bias_scale=cfg.density_bias_scale,
                         density_bias_radius=cfg.density_bias_radius)


class NerfProblem(Problem):
    """The NeRF as the loop's problem: volume renders of camera batches, three lr groups.

    ``ray_chunk`` None renders all rays in one graph; a number renders that many rays per
    checkpointed chunk (bounded memory at the paper's settings, pipeline/memory_plan.py): the same
    image and the same gradients within float tolerance.
    """

    def __init__(self, field: NerfField, cfg: NerfStageConfig, device: torch.device, seed: int = 0,
                 ray_chunk: int | None = None):
        self.field = field
        self.cfg = cfg
        self.device = device
        self.ray_chunk = ray_chunk
        self.occupancy = OccupancyGrid(cfg.occupancy_resolution, cfg.occupancy_threshold, device=device)
        # On the render's device: the ray jitter and the occupancy probes are drawn there.
        self.generator = torch.Generator(device=device).manual_seed(seed + 17)

    def param_groups(self) -> list[dict]:
        """Grid, MLP and background groups with the paper's learning rates."""
        c = self.cfg
        return [
            {"params": self.field.grid_parameters(), "lr": c.lr_grid, "name": "grid"},
            {"params": self.field.mlp_parameters(), "lr": c.lr_mlp, "name": "mlp"},
            {"params": self.field.background_parameters(), "lr": c.lr_background, "name": "background"},
        ]

    def render(self, cameras: Cameras | None) -> Rendered:
        """Training render (stratified jitter) with the weighted orientation loss; in checkpointed
        chunks when ``ray_chunk`` is set."""
        c = self.cfg
        if self.ray_chunk is None:
            out = render_cameras(self.field, cameras, c.resolution, c.resolution, c.samples_per_ray, self.occupancy,
                                 perturb=True, generator=self.generator, orientation=c.orientation_weight > 0)
        else:
            out = render_cameras_checkpointed(self.field, cameras, c.resolution, c.resolution, c.samples_per_ray,
                                              self.occupancy, perturb=True, generator=self.generator,
                                              orientation=c.orientation_weight > 0, chunk=self.ray_chunk)
        reg = c.orientation_weight * out.orientation if c.orientation_weight > 0 else None
        return Rendered(out.image, out.alpha, reg)

    @torch.no_grad()
    def render_views(self, cameras: Cameras, resolution: int) -> torch.Tensor:
        """Deterministic renders for previews, turntables and metrics (B, 3, H, W)."""
        out = render_cameras(self.field, cameras.to(self.device), resolution, resolution, self.cfg.samples_per_ray,
                             self.occupancy, perturb=False, chunk=1 << 14)
        return out.image.clamp(0.0, 1.0)

    def state_dict(self) -> dict:
        """Field parameters and the occupancy grid."""
        return {"field": self.field.state_dict(), "occupancy": self.occupancy.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.field.load_state_dict(state["field"])
        self.occupancy.load_state_dict(state["occupancy"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError:
            # A checkpoint from another device kind (CPU <-> CUDA generator states differ): the
            # jitter stream restarts from the seed; the field and optimiser resume exactly.
            pass

    def after_step(self, index: int) -> None:
        """Refresh the empty-space grid every ``occupancy_every`` steps."""
        if (index + 1) % max(1, self.cfg.occupancy_every) == 0:
            self.occupancy.update(self.field.density, self.generator)


@torch.no_grad()
def seen_colour(field: NerfField, points: torch.Tensor, reach: float = 0.06, samples: int = 24) -> torch.Tensor:
    """The colour the NeRF shows at surface points: composited along a short ray from outside, (N, 3).

    The iso-surface sits in the field's soft outer layer, where the albedo alone is paler than what
    a camera sees; compositing along the inward normal reproduces the rendered colour.
    """
    sigma0 = field.density(points)
    normals = field.normals(points, sigma0)
    t = torch.linspace(0.0, 2.0 * reach, samples, device=points.device)
    start = points + reach * normals
    pts = start[:, None, :] - t[None, :, None] * normals[:, None, :]
    sigma, rgb = field(pts.reshape(-1, 3))
    sigma, rgb = sigma.view(-1, samples), rgb.view(-1, samples, 3)
    alpha = 1.0 - torch.exp(-sigma * (2.0 * reach / samples))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    w = alpha * trans
    opacity = w.sum(1, keepdim=True)
    colour = (w[..., None] * rgb).sum(1) / opacity.clamp(min=1e-4)
    return torch.where(opacity > 1e-3, colour, field.albedo(points)).clamp(0.0, 1.0)


def nerf_mesh(ctx: JobContext, field: NerfField, final: bool) -> MeshData:
    """The NeRF's surface as a textured mesh: full export settings when final, a quick one otherwise."""
    cfg, ex = ctx.config.stage1, ctx.config.export
    budget = ex.face_budget if final else min(ex.face_budget, 5000)
    tex = ex.texture_size if final else min(ex.texture_size, 256)
    res = cfg.mesh_resolution if final else min(cfg.mesh_resolution, 64)
    return extract_textured_mesh(field.density, lambda x: seen_colour(field, x), res, cfg.mesh_level, budget, tex,
                                 ctx.device)


class NerfStage:
    """Stage 1: the NeRF from nothing; returns a :class:`NerfResult` (its field and textured mesh)."""

    name = STAGE
    config_attr = "stage1"

    def build(self, ctx: JobContext, incoming: None = None, models: StageModels | None = None) -> StageRun:
        """The NeRF, the prior, D_phi and the loop at the job's stage-1 settings."""
        cfg = ctx.config.stage1
        seed = ctx.config.seed
        method_cfg = with_start(cfg.method, ctx.start_t)
        prior, score_model, score_name = stage_models(ctx, STAGE, method_cfg, models)
        field = NerfField(field_settings(cfg), ctx.device, seed=seed)
        # Bounded memory at the paper's settings: checkpointed ray chunks when the whole render's
        # graph would not fit; None (one graph) when it does.
        chunk = plan_ray_chunk(cfg.views_per_iteration * cfg.resolution ** 2, cfg.samples_per_ray, cfg.grid.levels,
                               gpu_budget_bytes(ctx.device))
        problem = NerfProblem(field, cfg, ctx.device, seed, ray_chunk=chunk)
        cond = prior.condition(ctx.config.prompt, ctx.config.negative_prompt, method_cfg.guidance)
        preview_cam = Cameras.make(device=ctx.device, **PREVIEW_VIEW)

        def finish(history: list[StepReport]) -> NerfResult:
            mesh = nerf_mesh(ctx, field, final=True)
            metrics: dict[str, float] = {"occupied_fraction": problem.occupancy.occupied_fraction(),
                                         "faces": float(len(mesh.faces))}
            if ctx.reference is not None:
                cams = held_out_cameras()
                # The NeRF's own views (volume rendered), and then its extracted textured mesh measured
                # exactly like every later stage's mesh, so the stages compare like with like.
                metrics["nerf_psnr_db"] = psnr(problem.render_views(cams, cfg.resolution),
                                               ctx.reference.render(cams, cfg.resolution)[0])
                metrics.update({k: v for k, v in evaluate_mesh(ctx, mesh).items() if k in ("psnr_db", "chamfer_rel")})
            return NerfResult(mesh=mesh, field=field, metrics=metrics)

        return make_run(ctx, STAGE, cfg, method_cfg, problem, prior, score_model, score_name, cond, seed,
                        lambda: problem.render_views(preview_cam, cfg.resolution),
                        lambda: nerf_mesh(ctx, field, final=False), finish)


NERF_STAGE = NerfStage()


def run_stage1(ctx: JobContext) -> NerfResult:
    """Optimise the NeRF in a job, stream its progress; its field and textured mesh."""
    return run_stage(ctx, NERF_STAGE, None)
