"""What the mesh stages share: textured meshes, the colour field they start from, and the colour
stage that 2b (stage2.py) and 3 (stage3.py) both run.

A colour stage tunes a colour field on a fixed :class:`~dreamflow.pipeline.handoff.Surface`
(:class:`TextureProblem`, run by the one loop) and bakes it into the surface's UV layout. 2b and 3
differ only in their settings, their prior (stage 3: the refiner) and whether vertices may move a
little (stage 3's ``lr_geometry``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..export.mesh import MeshData, MeshError
from ..methods.loop import Problem, Rendered, StepReport
from ..render.raster import antialias, interpolate, rasterize, vertex_normals
from ..scene.cameras import Cameras
from ..scene.texture_field import TextureField
from .config import RefineStageConfig, TextureStageConfig
from .context import JobContext
from .handoff import InputMesh, MeshStageInput, NerfResult, Surface, SurfaceResult
from .metrics import evaluate_mesh
from .stage_loop import StageModels, StageRun, make_run, stage_models, with_start

#: Where previews look from: a three-quarter front view, as a person would first look at an object.
PREVIEW_CAMERA = dict(azimuth_deg=30.0, elevation_deg=15.0, distance=1.3, fovy_deg=50.0)
#: Colour renders are composited over white (the reference prior renders over white too).
COLOUR_BACKGROUND = 1.0


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


def camera_seed(ctx: JobContext, stage: str) -> int:
    """Each mesh stage draws its own camera sequence (stage 1 uses the job's seed itself)."""
    return ctx.config.seed + sum(map(ord, stage))


def incoming_metrics(ctx: JobContext, incoming: MeshStageInput) -> dict[str, float]:
    """The asset a stage starts from, measured like its result (``start_psnr_db``, ``start_chamfer_rel``),
    so that every stage's report shows what it changed with one yardstick."""
    mesh = incoming.mesh
    if mesh.texture is None or mesh.uvs is None:
        return {}
    return {f"start_{k}": v for k, v in evaluate_mesh(ctx, mesh).items() if k in ("psnr_db", "chamfer_rel")}


def colour_source(ctx: JobContext, incoming: MeshStageInput) -> TextureField:
    """The colour field a mesh stage starts from: the one a previous mesh stage tuned, else the
    stage-1 NeRF's colour network, else one fitted to a textured input mesh, else a fresh (grey) one."""
    if isinstance(incoming, SurfaceResult):
        return incoming.colour
    if isinstance(incoming, NerfResult):
        return TextureField.from_nerf(incoming.field)
    field = new_texture_field(ctx.config.texture, ctx.device, ctx.config.seed)
    src = incoming.mesh
    if src.texture is not None and src.uvs is not None:
        from .refine_input import fit_field_to_texture

        fit_field_to_texture(field, src, seed=ctx.config.seed)
    return field


def colour_surface(ctx: JobContext, incoming: MeshStageInput | None) -> Surface:
    """The fixed mesh of a colour stage: the previous mesh stage's surface, else the input mesh
    exactly (with its UVs if it has them), else stage 1's mesh."""
    if incoming is None:
        raise MeshError("texture tuning needs a mesh: run stage 1 or 2a first, or send an input mesh")
    if isinstance(incoming, SurfaceResult):
        return incoming.surface
    src = incoming.mesh
    uvs = src.uvs if isinstance(incoming, InputMesh) else None
    return Surface(torch.as_tensor(src.vertices, dtype=torch.float32, device=ctx.device),
                   torch.as_tensor(src.faces, device=ctx.device).long(), uvs)


class ColourStage:
    """A colour field tuned on the fixed surface and baked (2b and 3); returns a SurfaceResult."""

    name: str
    config_attr: str
    refiner = False   # stage 3 distils from the refiner (stage_loop.stage_models)

    def lr_geometry(self, cfg: TextureStageConfig | RefineStageConfig) -> float:
        """The learning rate of the per-vertex offsets (0: the surface stays exactly as it is)."""
        return 0.0

    def build(self, ctx: JobContext, incoming: MeshStageInput | None, models: StageModels | None = None) -> StageRun:
        """The colour field on the incoming surface, the prior, D_phi and the loop."""
        cfg = getattr(ctx.config, self.config_attr)
        prior, score_model, score_name = stage_models(ctx, self.name, cfg.method, models, refiner=self.refiner)
        surface = colour_surface(ctx, incoming)
        before = incoming_metrics(ctx, incoming)
        method_cfg = with_start(cfg.method, ctx.start_t)
        cond = prior.condition(ctx.config.prompt, ctx.config.negative_prompt, method_cfg.guidance)
        field = colour_source(ctx, incoming)
        f, uvs = surface.faces, surface.uvs
        problem = TextureProblem(surface.vertices, f, field, cfg.resolution, cfg.lr_grid, cfg.lr_mlp,
                                 self.lr_geometry(cfg))
        pcam = Cameras.make(device=ctx.device, **PREVIEW_CAMERA)
        layout: dict[str, MeshData] = {} if surface.layout is None else {"m": surface.layout}
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

        def finish(history: list[StepReport]) -> SurfaceResult:
            final = mesh(tex_size)
            vertices = surface.vertices if problem.offsets is None else problem.vertices().detach()
            return SurfaceResult(mesh=final, surface=Surface(vertices, f, uvs, final), colour=field,
                                 metrics={**evaluate_mesh(ctx, final), **before})

        return make_run(ctx, self.name, cfg, method_cfg, problem, prior, score_model, score_name, cond,
                        camera_seed(ctx, self.name), preview, mesh, finish)
