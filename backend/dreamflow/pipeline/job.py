"""One generation job: the enabled stages in order, then the files (GLB, turntable, loss plot, report).

``run_job`` is what the server's worker and the one-shot CLI call. Stages are a plain ordered list
of stage objects (pipeline/stage_loop.py ``Stage``): each builds its run from the previous stage's
typed result and returns its own (pipeline/handoff.py): stage 1 a ``NerfResult``, 2a, 2b and 3 a
``SurfaceResult``; a job that starts from a given mesh begins with an ``InputMesh``. Files written to ``out_dir`` (names relative to it in ``JobResult.files``):

- ``model.glb``: the final textured mesh (PBR material, texture embedded, Y-up as glTF wants);
- ``model.obj`` + ``model.mtl`` + ``model_albedo.png`` when ``export.write_obj``;
- ``turntable.png``: a grid of views of the final asset, its normal-shaded views below them (lumps
  show there), and the reference's, when there is one;
- ``loss.png``: the loss per step of every stage;
- ``report.json``: settings, per-stage seconds and metrics, the quality of the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..accel import pick_device
from ..config import ConfigError, to_dict
from ..events import EventSink, JobControl
from ..export.files import write_glb, write_obj, write_png
from ..export.mesh import MeshData, MeshError
from ..safe_files import atomic_write
from ..scene.cameras import Cameras, orbit
from .config import JobConfig
from .context import JobContext
from .handoff import StageResult
from .metrics import chamfer_relative, held_out_cameras, psnr
from .stage1 import NERF_STAGE
from .stage2 import GEOMETRY_STAGE, TEXTURE_STAGE
from .stage3 import REFINE_STAGE
from .stage_loop import Stage, run_stage

#: The pipeline, in order; each stage's settings are ``getattr(config, stage.config_attr)``.
STAGES: list[Stage] = [NERF_STAGE, GEOMETRY_STAGE, TEXTURE_STAGE, REFINE_STAGE]

TURNTABLE_VIEWS = 8
TURNTABLE_FOVY = 50.0
#: Default size of turntable tiles and evaluation views (``export.view_resolution`` sets it per job).
EVAL_RESOLUTION = 128


def turntable_distance(mesh: MeshData, nearest: float = 1.3) -> float:
    """Camera distance of the turntable: ``nearest``, or farther when the asset's bounding sphere
    about the origin would not fit the view (an asset larger than the unit box is still shown whole)."""
    if len(mesh.vertices) == 0:
        return nearest
    radius = float(np.linalg.norm(np.asarray(mesh.vertices, dtype=np.float64), axis=1).max())
    return max(nearest, 1.1 * radius / math.sin(math.radians(TURNTABLE_FOVY / 2.0)))


@dataclass
class JobResult:
    """What a finished job produced: file names (relative to out_dir) and the report."""

    files: dict[str, str] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def _stage_plan(config: JobConfig, start_stage: str | None) -> list[Stage]:
    names = [stage.name for stage in STAGES]
    if start_stage is not None and start_stage not in names:
        raise ConfigError(f"unknown start stage {start_stage!r}; this pipeline has {', '.join(names)}")
    first = names.index(start_stage) if start_stage is not None else 0
    return [stage for stage in STAGES[first:] if getattr(config, stage.config_attr).enabled]


def render_asset(mesh: MeshData, cameras: Cameras, resolution: int, device: torch.device) -> torch.Tensor:
    """The textured mesh rasterised over white, (B, 3, H, W) in [0, 1]."""
    from ..render.raster import render_mesh

    v = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    f = torch.as_tensor(mesh.faces, dtype=torch.long, device=device)
    uv = torch.as_tensor(mesh.uvs, dtype=torch.float32, device=device)
    tex = torch.as_tensor(mesh.texture[..., :3], device=device).float() / 255.0
    with torch.no_grad():
        out = render_mesh(v, f, cameras.to(device), resolution, uvs=uv, texture=tex, background=1.0)
    return out.image.clamp(0.0, 1.0)


def render_normals(mesh: MeshData, cameras: Cameras, resolution: int, device: torch.device) -> torch.Tensor:
    """The mesh's world-space face normals as colours ``(n + 1) / 2`` over white, (B, 3, H, W): one
    flat colour per triangle, so every lump and facet shows (interpolated normals would smooth
    away the wrinkles that the area ratio counts)."""
    from ..render.raster import render_mesh

    v = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long, device=device)
    corners = v[f]                                                    # each face its own three vertices
    normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
    normal = torch.nn.functional.normalize(normal, dim=-1).repeat_interleave(3, dim=0)
    with torch.no_grad():
        # No antialiasing: with no shared vertices every triangle edge would count as a silhouette.
        out = render_mesh(corners.reshape(-1, 3), torch.arange(3 * len(f), device=device).view(-1, 3), cameras.to(device),
                          resolution, mode="normal", normals=normal, background=1.0, aa=False)
    return out.image.clamp(0.0, 1.0)


def turntable_image(asset: MeshData, resolution: int, device: torch.device, reference=None) -> np.ndarray:
    """The turntable grid: the asset's views, its normal-shaded views below, then the reference's
    views when there is one; all from the same orbit, framed on the asset."""
    cams = orbit(TURNTABLE_VIEWS, elevation_deg=20.0, distance=turntable_distance(asset), fovy_deg=TURNTABLE_FOVY)
    rows = [render_asset(asset, cams, resolution, device), render_normals(asset, cams, resolution, device)]
    if reference is not None:
        rows.append(reference.render(cams, resolution)[0])
    return _grid(rows)


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (B, 3, H, W) images -> one (rows*H, B*W, 3) uint8 image."""
    lines = [torch.cat(list(r), dim=2) for r in rows]
    img = torch.cat(lines, dim=1)
    return (img.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def _loss_plot(ctx: JobContext, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    offset = 0
    for name, rec in ctx.stages.items():
        losses = [r.loss for r in rec.history]
        if losses:
            ax.plot(np.arange(offset, offset + len(losses)), losses, label=name, linewidth=0.8)
            offset += len(losses)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss 0.5 ||x - target||^2")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_job(config: JobConfig, out_dir: Path, sink: EventSink, control: JobControl,
            input_mesh: MeshData | None = None, start_stage: str | None = None, start_t: float | None = None,
            checkpoint_dir: Path | None = None) -> JobResult:
    """Run the enabled stages, write the asset and the report into ``out_dir``; raises Cancelled when told to stop."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    plan = _stage_plan(config, start_stage)
    if not plan:
        raise ConfigError("every stage is disabled; nothing to run")
    ctx = JobContext(config, out_dir, sink, control, device, None if checkpoint_dir is None else Path(checkpoint_dir),
                     input_mesh, start_t, stage_names=[stage.name for stage in plan])
    if config.prior.kind == "reference":
        from .components import reference_renderer

        ctx.reference = reference_renderer(config, device)  # fail early on a bad --reference file
        if ctx.reference.colours_from == "none":
            ctx.emit("log", {"level": "warning", "message": f"reference file {config.prior.reference} has no colour "
                              f"(no texture, vertex, face or material colour): it is rendered grey"})
    result: StageResult | None = None
    if start_stage is not None and start_stage != "stage1":
        from .refine_input import prepare_input

        # Checked and moved into the object box (MeshError otherwise): what the first stage takes.
        result, ctx.input_frame = prepare_input(input_mesh, start_stage)
    for stage in plan:
        control.check()
        result = run_stage(ctx, stage, result)
    if result is None:
        raise MeshError("no stage produced a mesh")
    asset = result.mesh

    files: dict[str, str] = {}
    write_glb(ctx.output_mesh(asset), out_dir / "model.glb")
    files["model"] = "model.glb"
    if config.export.write_obj:
        for p in write_obj(ctx.output_mesh(asset), out_dir / "model.obj"):
            files[p.name] = p.name

    res = config.export.view_resolution
    write_png(turntable_image(asset, res, device, ctx.reference), out_dir / "turntable.png")
    files["turntable"] = "turntable.png"
    _loss_plot(ctx, out_dir / "loss.png")
    files["loss"] = "loss.png"

    quality: dict[str, float | None] = {}
    if ctx.reference is not None:
        eval_cams = held_out_cameras()
        ref = ctx.reference.render(eval_cams, res)[0]
        quality["psnr_db"] = _finite(psnr(render_asset(asset, eval_cams, res, device), ref))
        quality["chamfer_rel"] = _finite(chamfer_relative(asset, ctx.reference.mesh))
        quality["eval_views"] = len(eval_cams)
        quality["eval_resolution"] = res
    report = {
        "prompt": config.prompt,
        "method": config.method,
        "prior": config.prior.kind,
        "device": str(device),
        "seconds_total": time.perf_counter() - start,
        # CPU seconds of this process (all threads): on a shared machine the wall time above also
        # counts other programs' turns, this does not.
        "cpu_seconds_total": time.process_time() - cpu_start,
        "stages": {name: {"seconds": rec.seconds, "steps": len(rec.history),
                          "metrics": {k: _finite(v) for k, v in rec.metrics.items()}}
                   for name, rec in ctx.stages.items()},
        "quality": quality,
        "reference": None if ctx.reference is None else {"file": config.prior.reference,
                                                         "colours_from": ctx.reference.colours_from},
        "mesh": {"vertices": int(len(asset.vertices)), "faces": int(len(asset.faces)),
                 "texture_size": list(asset.texture.shape[:2]) if asset.texture is not None else None},
        "config": to_dict(config),
    }
    files["report"] = "report.json"
    report["files"] = dict(files)
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2).encode())
    return JobResult(files, report)
