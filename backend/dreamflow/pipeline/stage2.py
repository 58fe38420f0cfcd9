"""Stage 2: DMTet geometry tuning on normal maps (2a), then a colour field on the fixed mesh (2b).

Both sub-stages are a :class:`~dreamflow.methods.loop.Problem` run by the one loop
(:class:`~dreamflow.methods.loop.Distillation`). 2a takes stage 1's :class:`NerfResult` (or the
job's :class:`InputMesh`) and returns a :class:`SurfaceResult`: the simplified, unwrapped surface
and the colour field that 2b and 3 tune on it (2b's colour stage is shared with stage 3:
mesh_stage.py). Both stream the same events as stage 1 (field names of the wire protocol), with
``stage`` = ``"geometry"`` or ``"texture"``:

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

from typing import Any

import torch
import torch.nn.functional as F

from ..export.mesh import MeshData, MeshError
from ..methods.loop import Problem, Rendered, StepReport
from ..priors.base import Prior
from ..render.raster import NORMAL_BACKGROUND, render_mesh
from ..scene.cameras import Cameras
from ..scene.dmtet import DMTet, laplacian_smoothness, normal_consistency
from .context import JobContext
from .handoff import InputMesh, NerfResult, Surface, SurfaceResult
from .mesh_stage import (PREVIEW_CAMERA, ColourStage, camera_seed, colour_source, incoming_metrics, surface_mesh,
                         textured_mesh)
from .metrics import evaluate_mesh
from .stage1 import seen_colour
from .stage_loop import StageModels, StageRun, make_run, run_stage, stage_models, with_start

GEOMETRY = "geometry"
TEXTURE = "texture"


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


def geometry_prompt(prompt: str, normal_map_caption: str) -> str:
    """The prompt 2a conditions the prior on: the job's, plus the normal-map caption when there is one."""
    return f"{prompt}, {normal_map_caption}" if normal_map_caption and prompt else prompt


def geometry_prior(prior: Prior) -> Prior:
    """The prior 2a distils normal maps from: the same one, except that an exact reference-object
    prior must look at the reference's normal map (its data), not at its colours."""
    from ..priors.reference import ReferenceObjectPrior

    if isinstance(prior, ReferenceObjectPrior):
        return ReferenceObjectPrior(_NormalMapRenderer(prior.renderer), std=prior.std)
    return prior


def initial_dmtet(ctx: JobContext, incoming: NerfResult | InputMesh, resolution: int) -> DMTet:
    """A DMTet grid whose SDF comes from the stage-1 density field (``geometry.init_from="density"``)
    or from the incoming mesh: stage 1's exported one (``"mesh"``), or an input mesh."""
    from ..scene.dmtet import sdf_from_density, sdf_from_mesh

    dmtet = DMTet(resolution, device=ctx.device)
    src = incoming.mesh
    nerf = incoming.field if isinstance(incoming, NerfResult) else None
    sdf = None
    if nerf is not None and ctx.config.geometry.init_from == "density":
        level = ctx.config.geometry.init_level
        if level <= 0:
            with torch.no_grad():
                level = float(torch.cat([nerf.density(p) for p in dmtet.grid.vertices.split(65536)]).mean())
        sdf = sdf_from_density(nerf.density, dmtet.grid, level)
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


class GeometryStage:
    """Stage 2a: DMTet from stage 1 (or the input mesh), tuned on normal maps with D_phi = x."""

    name = GEOMETRY
    config_attr = "geometry"

    def build(self, ctx: JobContext, incoming: NerfResult | InputMesh | None,
              models: StageModels | None = None) -> StageRun:
        """The DMTet, the normal-map prior, D_phi and the loop at the job's 2a settings."""
        from ..export.extract import simplify

        if incoming is None:
            raise MeshError("geometry tuning needs the stage-1 NeRF or an input mesh to start from")
        cfg = ctx.config.geometry
        before = incoming_metrics(ctx, incoming)
        method_cfg = with_start(cfg.method, ctx.start_t)
        prior, score_model, score_name = stage_models(ctx, GEOMETRY, method_cfg, models, view=geometry_prior)
        cond = prior.condition(geometry_prompt(ctx.config.prompt, cfg.normal_map_caption), ctx.config.negative_prompt,
                               method_cfg.guidance)
        dmtet = initial_dmtet(ctx, incoming, cfg.tet_resolution)
        problem = GeometryProblem(dmtet, cfg.resolution, cfg.lr, cfg.normal_consistency_weight, cfg.laplacian_weight)
        field = colour_source(ctx, incoming)
        bake = field
        if isinstance(incoming, NerfResult):
            # Bake what the NeRF shows, as stage 1's own mesh does: the albedo at the surface is paler
            # (measured on the house: 2a's better surface baked 17.5 dB from albedo vs 18.4 for stage 1's).
            nerf = incoming.field
            bake = lambda p: seen_colour(nerf, p)  # noqa: E731
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

        def finish(history: list[StepReport]) -> SurfaceResult:
            with torch.no_grad():
                v, f = dmtet.mesh()
            simple = simplify(surface_mesh(v, f), ctx.config.export.face_budget)
            v = torch.as_tensor(simple.vertices, device=ctx.device)
            f = torch.as_tensor(simple.faces, device=ctx.device).long()
            final = textured_mesh(v, f, bake, ctx.config.export.texture_size)
            return SurfaceResult(mesh=final, surface=Surface(v, f, None, final), colour=field,
                                 metrics={**evaluate_mesh(ctx, final), **before})

        return make_run(ctx, GEOMETRY, cfg, method_cfg, problem, prior, score_model, score_name, cond,
                        camera_seed(ctx, GEOMETRY), preview, mesh, finish)


class TextureStage(ColourStage):
    """Stage 2b: the colour field on the fixed mesh, APFO with the stage's score model (LoRA)."""

    name = TEXTURE
    config_attr = "texture"


GEOMETRY_STAGE = GeometryStage()
TEXTURE_STAGE = TextureStage()


def run_geometry_stage(ctx: JobContext, incoming: NerfResult | InputMesh) -> SurfaceResult:
    """Stage 2a in a job: its events and record; the tuned surface."""
    return run_stage(ctx, GEOMETRY_STAGE, incoming)


def run_texture_stage(ctx: JobContext, incoming: NerfResult | SurfaceResult | InputMesh) -> SurfaceResult:
    """Stage 2b in a job: its events and record; the textured surface."""
    return run_stage(ctx, TEXTURE_STAGE, incoming)
