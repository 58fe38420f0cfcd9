"""Scoring a 3D asset the way the papers do, and against the toy world's true object.

**R-precision** (DreamFusion's, as DreamFlow Tables 2-3 use it): render the asset from ``views``
azimuths evenly spaced at elevation 15 degrees, distance 1.2 (the papers use 120; the field of view,
which they do not give, is 60 degrees here, so a toy object is whole in every view); for every view
retrieve the best-scoring prompt among the prompt set; the asset's R-precision (R = 1) is the
fraction of its **views** whose top-1 prompt is the asset's own, and a set of assets reports the
mean over assets (= over all views, when every asset has the same number). The asset's own prompt
is always a candidate. ``asset_top1`` also says whether the scores summed over all views retrieve
the right prompt (one decision per asset).

**Ground truth** (toy-world prompts only), against the prompt's true object from world.py:

- ``chamfer_rel``: pipeline.metrics.chamfer_relative (symmetric, relative to the true object's
  bounding-box diagonal; 0 is exact);
- ``silhouette_iou``: coverage (alpha > 0.5) of the asset against the true object over the same
  evaluation views, intersection over union summed over all views (1 is exact);
- ``colour_error``: CIE76 Delta E in CIELAB (D65) between the mean colour of the asset's covered
  pixels and that of the true object's, over the same views (the true object drawn as the world's
  images show it; about 2.3 is a just-noticeable difference, red vs orange is about 50);
- surface measures (export/measures.py, one implementation for the job, the CLI and the benches),
  **scale-free and yaw-free**: the asset centred, scaled to the truth's bounding-box diagonal and
  turned about the vertical axis to its best yaw (the prior knows size only up to its camera
  range and yaw not at all): ``chamfer_aligned`` (of the diagonal; 0 exact), ``normal_consistency``
  (area-weighted mean |cos| to the truth's normal at the closest point; a clean cube 1.0, a
  sphere judged as a cube 0.83), ``area_ratio`` (1 exact; wrinkles raise it);
- raw: ``area_ratio_raw``, ``half_extent`` against ``true_half_extent`` (the world's 0.4);
- ``colour_noise``: mean dE76 between each surface sample's colour and its 16 nearest samples'
  mean (0 for flat colour; speckle high), beside ``true_colour_noise``, what the true object's
  smooth shading gives.

``score_stages`` applies them to each stage's final mesh (with no scorer, those that need no render).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..export.measures import colour_noise, srgb_to_lab, surface_measures  # noqa: F401 (srgb_to_lab: callers import it here)
from ..export.mesh import MeshData, MeshError
from ..pipeline.metrics import EVAL_RESOLUTION, chamfer_relative, held_out_cameras
from ..scene.cameras import Cameras
from .scoring import Scorer

#: The papers' evaluation: 120 views at elevation 15, distance 1.2.
PAPER_VIEWS = 120
#: Background of every evaluation render (the world's images are drawn over white).
BACKGROUND = 1.0
#: Field of view of the evaluation views. The papers give elevation 15 and distance 1.2 but no
#: field of view; at 60 degrees a toy object (half-extent 0.4) is whole in every view.
EVAL_FOVY_DEG = 60.0


@dataclass
class Renderable:
    """A mesh with what colours it: its texture (an asset) or per-vertex colours (a true object)."""

    mesh: MeshData
    vertex_colours: np.ndarray | None = None   # (N, 3) in [0, 1]

    def render(self, cameras: Cameras, resolution: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] over white and coverage (B, 1, H, W)."""
        from ..priors.reference import ReferenceRenderer

        if self.mesh.texture is None and self.vertex_colours is None:
            raise MeshError("the asset has no texture and no vertex colours, so its colour cannot be judged")
        mesh = self.mesh
        if mesh.texture is not None and not mesh.texture.flags.writeable:  # a GLB's image: torch wants to own it
            mesh = replace(mesh, texture=mesh.texture.copy())
        # No supersampling: drawn exactly like the world's images (dataset.render_object).
        renderer = ReferenceRenderer(mesh, self.vertex_colours, background=BACKGROUND, supersample=1, device=device)
        return renderer.render(cameras, resolution)


def evaluation_cameras(views: int = PAPER_VIEWS) -> Cameras:
    """``views`` azimuths evenly spaced at elevation 15, distance 1.2, fovy 60 (the project's held-out orbit)."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    return held_out_cameras(views, 15.0, 1.2, EVAL_FOVY_DEG)


def normalise_prompt(prompt: str) -> str:
    """Case and spacing do not make two prompts different."""
    return " ".join(prompt.lower().split())


def retrieve(scorer: Scorer, images: torch.Tensor, prompt: str, prompts: Sequence[str],
             batch: int = 64) -> dict[str, Any]:
    """Top-1 retrieval of ``prompt`` among ``prompts`` for each image: R-precision (R = 1) over the views."""
    candidates = list(dict.fromkeys(prompts))
    keys = [normalise_prompt(p) for p in candidates]
    if normalise_prompt(prompt) not in keys:
        candidates.append(prompt)
        keys.append(normalise_prompt(prompt))
    target = keys.index(normalise_prompt(prompt))
    scorer.check_prompts(candidates)
    scores = torch.cat([scorer.scores(images[i:i + batch], candidates).float().cpu()
                        for i in range(0, len(images), batch)])
    top = scores.argmax(1)
    hits = (top == target)
    counts = torch.bincount(top, minlength=len(candidates))
    return {
        "r_precision": float(hits.float().mean()),
        "views_right": int(hits.sum()),
        "asset_top1": bool(int(scores.sum(0).argmax()) == target),
        "most_retrieved": candidates[int(counts.argmax())],
        "prompt_set_size": len(candidates),
    }


def mean_colour(images: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """Mean sRGB colour of the covered pixels (alpha > 0.5) over all images; NaN when nothing is covered."""
    mask = (alpha > 0.5).float()
    total = float(mask.sum())
    if total == 0:
        return np.full(3, np.nan)
    return ((images * mask).sum(dim=(0, 2, 3)) / total).cpu().numpy().astype(np.float64)


def ground_truth_measures(asset: Renderable, truth: Renderable, cameras: Cameras,
                          resolution: int = EVAL_RESOLUTION, device: torch.device | str = "cpu") -> dict[str, float]:
    """Chamfer (relative), silhouette IoU, mean-colour error (CIELAB Delta E 76), the surface
    measures and the colour noise of an asset against the true object."""
    img_a, alpha_a = asset.render(cameras, resolution, device)
    img_t, alpha_t = truth.render(cameras, resolution, device)
    ma, mt = alpha_a > 0.5, alpha_t > 0.5
    union = float((ma | mt).sum())
    iou = float((ma & mt).sum()) / union if union else float("nan")
    ca, ct = mean_colour(img_a, alpha_a), mean_colour(img_t, alpha_t)
    delta_e = float(np.linalg.norm(srgb_to_lab(ca) - srgb_to_lab(ct)))
    return {
        "silhouette_iou": iou,
        "colour_error": delta_e,
        "mean_colour_rgb": [round(float(v), 4) for v in ca],
        "true_colour_rgb": [round(float(v), 4) for v in ct],
        **mesh_measures(asset, truth),
    }


def mesh_measures(asset: Renderable, truth: Renderable) -> dict[str, float]:
    """The ground-truth measures that need no render (seconds): relative Chamfer, the surface
    measures and the colour noise of the asset and of the truth."""
    return {
        "chamfer_rel": chamfer_relative(asset.mesh, truth.mesh),
        **surface_measures(asset.mesh, truth.mesh),
        "colour_noise": colour_noise(asset.mesh, asset.vertex_colours),
        "true_colour_noise": colour_noise(truth.mesh, truth.vertex_colours),
    }


def true_object(prompt: str) -> Renderable:
    """The toy world's object of a prompt, coloured as the world's images show it (parse_prompt's
    error for a prompt the world does not know)."""
    from .dataset import shaded_colours
    from .world import object_mesh, parse_prompt

    shape, colour = parse_prompt(prompt)
    mesh = object_mesh(shape)
    return Renderable(MeshData(mesh.vertices.numpy().astype(np.float32), mesh.faces.numpy().astype(np.int32)),
                      shaded_colours(mesh, colour).numpy())


def textured_true_object(prompt: str, texture_size: int = 256) -> MeshData:
    """The true object as an asset: UV-unwrapped, its world shading baked into a texture (what a
    perfect generation would export; tests and baselines score it through the asset path)."""
    from ..export.bake import dilate, texel_positions
    from ..export.unwrap import unwrap
    from .dataset import shaded_colours
    from .world import ToyMesh, object_mesh, parse_prompt

    shape, colour = parse_prompt(prompt)
    mesh = object_mesh(shape)
    flat = unwrap(MeshData(mesh.vertices.numpy(), mesh.faces.numpy().astype(np.int32), mesh.normals.numpy()),
                  texture_size)
    colours = shaded_colours(ToyMesh(torch.from_numpy(flat.vertices), torch.from_numpy(flat.faces).long(),
                                     torch.from_numpy(flat.normals)), colour).numpy()
    # texel_positions interpolates the mesh's per-vertex attribute over its UV layout: handed the
    # colours in place of the positions, it gives each covered texel its interpolated colour.
    mask, texel_colours = texel_positions(MeshData(colours.astype(np.float32), flat.faces, None, flat.uvs), texture_size)
    image = np.zeros((texture_size, texture_size, 3), dtype=np.float32)
    image[mask] = texel_colours.clamp(0, 1).numpy()
    texture = (dilate(image, mask) * 255.0 + 0.5).astype(np.uint8)
    return MeshData(flat.vertices, flat.faces, flat.normals, flat.uvs, texture)


def world_prompts() -> list[str]:
    """The toy world's 36 prompts."""
    from .world import PROMPTS

    return list(PROMPTS)


def knows_prompt(prompt: str) -> bool:
    """Whether the toy world has an object for ``prompt``."""
    from .world import parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def score_asset(asset: Renderable | MeshData, prompt: str, scorer: Scorer, prompts: Sequence[str] | None = None,
                views: int = PAPER_VIEWS, ground_truth: bool = True, device: torch.device | str = "cpu") -> dict[str, Any]:
    """R-precision of an asset for its prompt and, for a toy-world prompt, its ground-truth measures.

    ``prompts`` defaults to the toy world's 36; ``ground_truth`` adds chamfer_rel, silhouette_iou
    and colour_error when the world knows the prompt (else ``ground_truth_skipped`` says why).
    """
    if isinstance(asset, MeshData):
        asset = Renderable(asset)
    prompts = world_prompts() if prompts is None else list(prompts)
    cams = evaluation_cameras(views)
    images, _ = asset.render(cams, scorer.resolution, device)
    result: dict[str, Any] = {"prompt": prompt, "scorer": scorer.name, "views": views,
                              "elevation_deg": 15.0, "distance": 1.2}
    result.update(retrieve(scorer, images, prompt, prompts))
    if ground_truth:
        if knows_prompt(prompt):
            result.update(ground_truth_measures(asset, true_object(prompt), cams, device=device))
        else:
            result["ground_truth_skipped"] = "the toy world has no object for this prompt"
    # JSON has no NaN: a measure that is undefined (an asset that covers no pixel) is null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}


# --- assets on disk ------------------------------------------------------------------------------


def load_asset(path: str | Path) -> tuple[MeshData, str | None]:
    """An asset folder as the pipeline writes it (model.glb, report.json) or a GLB file: the mesh and its prompt."""
    from ..export.files import read_glb

    path = Path(path)
    prompt = None
    if path.is_dir():
        glb = path / "model.glb"
        report = path / "report.json"
        if report.is_file():
            try:
                prompt = json.loads(report.read_text()).get("prompt") or None
            except (OSError, ValueError) as exc:
                raise MeshError(f"{report} is not a readable JSON report: {exc}") from exc
    else:
        glb = path
    if not glb.is_file():
        raise MeshError(f"{path}: no asset there (expected a folder with model.glb, as `dreamflow generate` writes, or a .glb file)")
    mesh = read_glb(glb)
    if mesh.texture is None or mesh.uvs is None:
        raise MeshError(f"{glb} has no texture, so its colour cannot be judged")
    return mesh, prompt


#: The measures each stage and each asset reports, and the table and the means show.
MEASURE_KEYS = ("r_precision", "chamfer_rel", "silhouette_iou", "colour_error", "chamfer_aligned",
                "normal_consistency", "area_ratio", "area_ratio_raw", "half_extent", "colour_noise")


def score_stages(meshes: dict[str, MeshData], prompt: str, scorer: Scorer | None, views: int = PAPER_VIEWS,
                 device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Every measure of each stage's final mesh (stage name -> MEASURE_KEYS, plus the truth's
    half-extent and colour noise), in the stages' order. With no ``scorer`` only the measures that
    need no render (:func:`mesh_measures`, seconds a stage); R-precision, IoU and colour error are null."""
    out = {}
    for stage, mesh in meshes.items():
        if scorer is None:
            q: dict[str, Any] = mesh_measures(Renderable(mesh), true_object(prompt))
        else:
            q = score_asset(mesh, prompt, scorer, views=views, device=device)
        out[stage] = {k: q.get(k) for k in (*MEASURE_KEYS, "true_half_extent", "true_colour_noise")}
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of score_asset results (one line per asset, then the mean)."""
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    def surface(r: dict) -> str:
        return (f"{num(r.get('chamfer_aligned'), '.4f'):>7} {num(r.get('normal_consistency'), '.3f'):>5} "
                f"{num(r.get('area_ratio'), '.2f'):>5} {num(r.get('half_extent'), '.3f'):>6} "
                f"{num(r.get('colour_noise'), '.1f'):>5}")

    head = (f"{'asset':<28} {'prompt':<22} {'R-prec':>6} {'views':>7} {'top1':>4} {'chamfer':>8} {'sil IoU':>7} "
            f"{'dE76':>6} {'CD~':>7} {'NC~':>5} {'area~':>5} {'h-ext':>6} {'noise':>5}  most retrieved")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{str(r.get('asset', ''))[-28:]:<28} {r['prompt'][:22]:<22} {num(r['r_precision'], '.3f'):>6} "
                     f"{r['views_right']:>3}/{r['views']:<3} {'yes' if r['asset_top1'] else 'no':>4} "
                     f"{num(r.get('chamfer_rel'), '.4f'):>8} {num(r.get('silhouette_iou'), '.3f'):>7} "
                     f"{num(r.get('colour_error'), '.1f'):>6} {surface(r)}  {r['most_retrieved']}")
    if len(rows) > 1:
        s = summarise(rows)
        lines.append("-" * len(head))
        lines.append(f"{'mean of ' + str(len(rows)) + ' assets':<28} {'':<22} {num(s['r_precision'], '.3f'):>6} {'':>7} "
                     f"{num(s['asset_top1'], '.2f'):>4} {num(s.get('chamfer_rel'), '.4f'):>8} "
                     f"{num(s.get('silhouette_iou'), '.3f'):>7} {num(s.get('colour_error'), '.1f'):>6} {surface(s)}")
    return "\n".join(lines)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Means over assets of R-precision, asset_top1 and the ground-truth measures (those present)."""
    out: dict[str, float | None] = {"assets": float(len(rows))}
    for key in ("asset_top1", *MEASURE_KEYS):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float, bool))]
        out[key] = float(np.mean(vals)) if vals else None
    return out
