"""Milliseconds per iteration of each stage at the paper's settings, against the diffusion model's own cost.

Runs real iterations of the real code: the pipeline's own stage objects (pipeline/job.py
``STAGES``, the ones ``run_job`` runs) build the stage's run exactly as a job does (its Problem:
NeRF volume render, DMTet normal maps, colour field on a mesh; its D_phi; its loop and memory
ladder), from the job settings of the preset, on the real prior class (``StableDiffusionPrior`` / ``SdxlRefinerPrior``)
built with the real architecture and random weights (bench/arch.py: same FLOPs, no download),
the real LoRA score model, and the one loop (``Distillation.run``, so its per-step NaN guard and
rollback snapshots are counted too). Nothing in the loop changes: the parts are timed by wrapping
the prior's, score model's, problem's and optimiser's methods with synchronised timers, and the
backward pass is split by gradient hooks on the latent and on the render. Those synchronisations
cost a GPU the overlap of launching and running, so the headline time per iteration comes from as
many iterations again with the timers off.

    .venv/bin/python bench/iteration.py --stage 1 --arch sd21 --device cuda --iters 50 --warmup 10
    .venv/bin/python bench/iteration.py --stage 3 --arch sdxl-refiner --device cuda
    .venv/bin/python bench/iteration.py --stage 2b --arch tiny --device cpu --preset preview

The floor is the UNet passes alone (guided prior pass, D_phi's pass, the LoRA update's forward,
backward and AdamW step) on the same latents, timed in the same run; ``iteration / floor`` is how
much everything else costs on top. The projected stage time is the median iteration times the
paper's iteration count (4000, 5000, 2000, 300). The field starts as a real run is after its first
occupancy refresh (step 16), so empty space is skipped as it is for the rest of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.iteration from the repo root
    from . import arch as arch_mod
except ImportError:  # pragma: no cover - script mode
    import arch as arch_mod  # type: ignore[no-redef]

from dreamflow.config import parse_cli_overrides
from dreamflow.fastpath import FastPath, apply_fast_path, choose_dtype, for_device
from dreamflow.methods.loop import Distillation
from dreamflow.pipeline.config import JobConfig, build_config
from dreamflow.pipeline.context import JobContext
from dreamflow.pipeline.handoff import InputMesh
from dreamflow.pipeline.job import STAGES as JOB_STAGES
from dreamflow.pipeline.stage_loop import Stage, StageModels, StageRun

STAGES: tuple[str, ...] = ("1", "2a", "2b", "3")
#: The paper's iteration counts (DreamFlow, section 4 / appendix): what a stage's time projects to.
PAPER_ITERATIONS = {"1": 4000, "2a": 5000, "2b": 2000, "3": 300}
STAGE_NAMES = {"1": "stage 1 NeRF", "2a": "stage 2a geometry", "2b": "stage 2b texture", "3": "stage 3 refine"}
#: Breakdown rows, in iteration order, with what each measures.
PARTS: dict[str, str] = {
    "render_fwd": "render forward (3D)",
    "vae_encode_fwd": "VAE encode forward",
    "lora_update": "LoRA update (UNet fwd+bwd+AdamW)",
    "prior_unet": "prior UNet pass (cond+uncond)",
    "lora_fwd": "D_phi UNet pass (LoRA on)",
    "vae_encode_bwd": "VAE encode backward",
    "render_bwd": "3D backward",
    "optimiser": "optimiser step (3D params)",
    "after_step": "after-step hook (occupancy refresh)",
}
PROMPT = "a DSLR photo of a delicious hamburger"


class _Stop(Exception):
    """Raised from the loop's step callback once enough iterations were timed."""


@dataclass
class BenchSettings:
    """What to run: one stage with one prior architecture on one device."""

    stage: str = "1"
    arch: str = "tiny"
    device: str = "cpu"
    iters: int = 20
    warmup: int = 3
    preset: str = "paper"
    fast: bool = True
    dtype: str = "auto"
    phi_base: str = "shared"      # "shared": LoRA on the prior's UNet; "separate": a second (v-model) UNet
    ray_chunk: str = "auto"       # stage 1: "auto" (fit the memory budget), "none", or a number of rays
    compile: bool = False
    seed: int = 0
    workdir: str | None = None
    overrides: dict[str, Any] | None = None  # dotted config paths, as the CLI's --set stage1.steps=200
    models: str | None = None     # a folder of arch.build_model_folders: load the priors from it (else built in-process)
    switches: dict[str, Any] | None = None  # FastPath fields set on top of the device's fast path (one switch off)


class Timers:
    """Synchronised wall-clock timers of named parts, per iteration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        # Off: parts and marks cost nothing (no synchronisation), for the uninstrumented run.
        self.enabled = True

    def now(self) -> float:
        """Seconds, after the device has finished everything queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the time spent inside to ``name``."""
        if not self.enabled:
            yield
            return
        start = self.now()
        try:
            yield
        finally:
            self.current[name] = self.current.get(name, 0.0) + self.now() - start

    def median_ms(self, fn: Callable[[], Any], warmup: int, repeats: int) -> float:
        """Median milliseconds of ``repeats`` synchronised calls of ``fn`` after ``warmup`` calls."""
        for _ in range(warmup):
            fn()  # allocator, lazy initialisation
        times = []
        for _ in range(repeats):
            start = self.now()
            fn()
            times.append((self.now() - start) * 1e3)
        return statistics.median(times)

    def mark(self, name: str) -> None:
        """Remember the first time ``name`` happened in this iteration."""
        if self.enabled:
            self.marks.setdefault(name, self.now())

    def take(self) -> dict[str, float]:
        """This iteration's parts (backward split from the marks); resets for the next one."""
        parts = dict(self.current)
        m = self.marks
        if "latent_grad" in m and "image_grad" in m:
            parts["vae_encode_bwd"] = m["image_grad"] - m["latent_grad"]
        if "image_grad" in m and "optimiser_start" in m:
            parts["render_bwd"] = m["optimiser_start"] - m["image_grad"]
        self.current, self.marks = {}, {}
        return parts


def _wrap(obj: Any, method: str, timers: Timers, name: str,
          after: Callable[[Any], None] | None = None) -> None:
    """Replace ``obj.method`` by a timed call of the original (instance attribute, class untouched)."""
    original = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timers.part(name):
            out = original(*args, **kwargs)
        if after is not None:
            after(out)
        return out

    setattr(obj, method, timed)


def _hook(tensor: torch.Tensor, timers: Timers, name: str) -> None:
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: timers.mark(name))


@dataclass
class StageBench:
    """A built stage: the pipeline's own run of it (the loop a job steps) and what the table reports."""

    run: StageRun
    settings: dict[str, Any]
    fast_path: list[str]
    memory_fallbacks: list[str]   # the run's memory ladder: what had to be applied

    @property
    def loop(self) -> Distillation:
        """The stage's loop, as run_job steps it."""
        return self.run.loop


#: The bench's stage names -> the pipeline's stage objects (pipeline/job.py STAGES).
PIPELINE_STAGE = {"1": "stage1", "2a": "geometry", "2b": "texture", "3": "refine"}


def pipeline_stage(stage: str) -> Stage:
    """The stage object run_job uses for the bench's ``stage`` ("1", "2a", "2b", "3")."""
    return {st.name: st for st in JOB_STAGES}[PIPELINE_STAGE[stage]]


def _check_arch(stage: str, arch: str) -> None:
    if arch not in arch_mod.ARCH_NAMES:
        raise SystemExit(f"unknown --arch {arch!r}; choose one of {', '.join(arch_mod.ARCH_NAMES)}")
    if stage == "3" and arch == "sd21":
        raise SystemExit("stage 3 refines with the SDXL refiner: use --arch sdxl-refiner (or tiny)")
    if stage != "3" and arch == "sdxl-refiner":
        raise SystemExit(f"stage {stage} distils from SD 2.1: use --arch sd21 (or tiny)")


def sphere_input(job: JobConfig, device: torch.device, radius: float = 0.35) -> InputMesh:
    """What the mesh stages start from in the bench: a sphere's surface on the geometry stage's tet
    grid, given to the stage as a job's input mesh is."""
    from dreamflow.pipeline.mesh_stage import surface_mesh
    from dreamflow.scene.dmtet import DMTet

    dmtet = DMTet(job.geometry.tet_resolution, device=device)
    dmtet.set_sdf(dmtet.grid.vertices.norm(dim=-1) - radius)
    with torch.no_grad():
        v, f = dmtet.mesh()
    return InputMesh(mesh=surface_mesh(v, f))


def bench_job(s: BenchSettings) -> JobConfig:
    """The job settings the bench's stage is built from: the preset with the overrides and the bench's prompt."""
    return replace(build_config(s.preset, s.overrides), prompt=PROMPT, negative_prompt="", seed=s.seed,
                   device=s.device)


def build_stage(s: BenchSettings) -> StageBench:
    """The pipeline's stage object built at the preset's settings on the bench's prior (the real
    architecture with random weights): the same problem, D_phi, loop and memory ladder a job runs."""
    from dreamflow.events import JobControl, NullSink
    from dreamflow.memory import free_memory

    _check_arch(s.stage, s.arch)
    device = torch.device(s.device)
    job = bench_job(s)
    stage = pipeline_stage(s.stage)
    stage_cfg = getattr(job, stage.config_attr)
    # --no-fast is the "before" of every measurement: float32, unfused attention, nothing offloaded.
    fast = replace(for_device(device), compile_unet=s.compile) if s.fast else FastPath(sdpa=False, offload_text_encoder=False)
    fast = replace(fast, **(s.switches or {}))
    dtype = choose_dtype(device, s.dtype if s.fast else "float32")
    arch = s.arch
    if s.stage == "3" and arch == "tiny":
        arch = "tiny-refiner"
    # Real SD renders (256 px in stage 1) are encoded at the VAE's native 512, as the pipeline does.
    encode_size = 512 if arch == "sd21" else None
    prior = arch_mod.build_prior(arch, device, dtype, encode_size=encode_size, seed=s.seed, workdir=s.workdir,
                                 models=s.models)
    applied = apply_fast_path(prior, fast, device)
    phi_base = None
    if s.phi_base == "separate" and s.stage != "3" and stage_cfg.method.score_model == "lora":
        # DreamFlow's D_phi base is SD 2.1-v: a second UNet of the same shape (no VAE needed).
        phi_base = arch_mod.build_prior(arch, device, dtype, seed=s.seed + 7, workdir=s.workdir,
                                        prediction_type="v_prediction", models=s.models)
        phi_base.vae = None
        applied += [f"phi:{a}" for a in apply_fast_path(phi_base, fast, device)]
    out_dir = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="dreamflow-bench-"))
    ctx = JobContext(job, out_dir, NullSink(), JobControl(), device, stage_names=[stage.name])
    incoming = None if s.stage == "1" else sphere_input(job, device)
    run = stage.build(ctx, incoming, StageModels(prior, phi_base))
    problem = run.problem
    views = stage_cfg.views_per_iteration
    extra: dict[str, Any] = {}
    if s.stage == "1":
        if s.ray_chunk == "none":
            problem.ray_chunk = None
        elif s.ray_chunk != "auto":  # "auto": the stage's own plan for the memory budget
            problem.ray_chunk = int(s.ray_chunk)
        # Steady state of a run: the empty-space grid has seen the field once (step 16 on).
        problem.occupancy.update(problem.field.density, problem.generator)
        extra.update(samples_per_ray=stage_cfg.samples_per_ray, ray_chunk=problem.ray_chunk or "all",
                     occupied=round(problem.occupancy.occupied_fraction(), 3))
    elif s.stage == "2a":
        extra.update(tet_resolution=stage_cfg.tet_resolution)
    else:
        extra.update(faces=int(problem.faces.shape[0]))
    free_memory()
    loop = run.loop
    latent = (stage_cfg.resolution if encode_size is None else encode_size) // 8 if loop.prior.is_latent else None
    trainable = getattr(loop.score_model, "trainable", False)
    info = dict(stage=s.stage, name=STAGE_NAMES[s.stage], arch=s.arch, device=str(device), preset=s.preset,
                dtype=str(dtype).replace("torch.", ""), resolution=stage_cfg.resolution, views=views,
                cfg_batch=2 * views, latent=f"{latent}x{latent}" if latent else "-",
                score_model=type(loop.score_model).__name__ + (" (trained)" if trainable else ""),
                phi_base=s.phi_base if trainable else "-", unet_params_m=round(arch_mod.parameter_count(prior.unet) / 1e6, 1),
                **extra)
    return StageBench(run, info, applied, run.ladder.applied)


def _instrument(loop: Distillation, timers: Timers, captured: dict[str, torch.Tensor]) -> None:
    """Timed wrappers around the parts; the last render and latents are kept for the floor."""
    problem, prior, score = loop.problem, loop.prior, loop.score_model

    def rendered(out: Any) -> None:
        captured["images"] = out.image.detach()
        _hook(out.image, timers, "image_grad")

    def encoded(x: torch.Tensor) -> None:
        captured["latents"] = x.detach()
        _hook(x, timers, "latent_grad")

    _wrap(problem, "render", timers, "render_fwd", rendered)
    _wrap(prior, "encode", timers, "vae_encode_fwd", encoded)
    _wrap(prior, "denoise", timers, "prior_unet")
    _wrap(score, "denoise", timers, "lora_fwd")
    if getattr(score, "trainable", False):
        _wrap(score, "update", timers, "lora_update")
    original_step = loop.optimiser.step

    def step(*args: Any, **kwargs: Any) -> Any:
        timers.mark("optimiser_start")
        with timers.part("optimiser"):
            return original_step(*args, **kwargs)

    loop.optimiser.step = step  # type: ignore[method-assign]
    _wrap(problem, "after_step", timers, "after_step")


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

    return {"median": statistics.median(ordered), "p10": q(0.1), "p90": q(0.9), "min": ordered[0], "max": ordered[-1]}


def _floor(loop: Distillation, latents: torch.Tensor, images: torch.Tensor, repeats: int, timers: Timers) -> dict[str, float]:
    """The UNet passes alone (and the VAE encode forward+backward) on the iteration's shapes, in ms."""
    prior, score, cond = loop.prior, loop.score_model, loop.cond
    cams = loop.cameras.sample(latents.shape[0]) if loop.cameras is not None else None
    sigma = prior.sigma(0.5).to(latents.device)
    noisy = latents + sigma * torch.randn_like(latents)
    passes: dict[str, Callable[[], Any]] = {"prior_unet": lambda: prior.denoise(noisy, sigma, cond, cams)}
    if getattr(score, "trainable", False):
        passes["lora_fwd"] = lambda: score.denoise(noisy, sigma, cond, cams, x_clean=latents)
        passes["lora_update"] = lambda: score.update(latents, sigma, cond, cams)

    def vae() -> None:
        leaf = images.detach().clone().requires_grad_(True)
        prior.encode(leaf).sum().backward()

    if prior.is_latent:
        passes["vae_encode_fwd_bwd"] = vae
    return {name: timers.median_ms(fn, warmup=1, repeats=repeats) for name, fn in passes.items()}


def run_bench(s: BenchSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the stage, run warm-up and timed iterations and the floor; the results as a dict."""
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available on this machine")
    built_at = time.perf_counter()
    bench = build_stage(s)
    build_s = time.perf_counter() - built_at
    loop = bench.loop
    timers = Timers(device)
    captured: dict[str, torch.Tensor] = {}
    _instrument(loop, timers, captured)
    # Warm-up, then `iters` iterations with every part synchronised and timed (the breakdown),
    # then `iters` with the timers off: on a GPU each part's synchronisation costs the overlap of
    # Python's kernel launches with the GPU's work, so the plain run is the iteration's real time.
    instrumented_end = s.warmup + s.iters
    total = instrumented_end + s.iters
    if len(loop.plan) < total:
        raise SystemExit(f"the stage's plan has {len(loop.plan)} steps; {s.warmup} warm-up + 2 x {s.iters} iterations "
                         f"need {total} (lower --iters/--warmup or raise the stage's steps with --set)")
    iteration_ms: list[float] = []
    instrumented_ms: list[float] = []
    cpu_ms: list[float] = []
    parts: list[dict[str, float]] = []
    health = {"rollbacks": 0, "nonfinite_steps": 0}
    state = {"last": timers.now(), "cpu": time.process_time(), "count": 0}
    # A fast path that trades precision for speed must not trade away the result: count the steps
    # whose loss or gradient is not finite (seen here, before the loop rolls them back).
    step = loop.step

    def checked_step(info):
        report = step(info)
        health["nonfinite_steps"] += not (math.isfinite(report.loss) and math.isfinite(report.grad_norm))
        return report

    loop.step = checked_step  # type: ignore[method-assign]

    def on_step(report) -> None:
        now = timers.now()
        cpu_now = time.process_time()
        state["count"] += 1
        elapsed = (now - state["last"]) * 1e3
        part = {k: v * 1e3 for k, v in timers.take().items()}
        phase = "warm-up" if state["count"] <= s.warmup else "breakdown" if state["count"] <= instrumented_end else "plain"
        if phase == "breakdown":
            instrumented_ms.append(elapsed)
            parts.append(part)
        elif phase == "plain":
            iteration_ms.append(elapsed)
            # Process CPU time: on a shared CPU machine it tracks the work done, not the waiting.
            cpu_ms.append((cpu_now - state["cpu"]) * 1e3)
        if state["count"] == instrumented_end:
            timers.enabled = False
        if log is not None:
            log(f"  iteration {state['count']}/{total}: {elapsed:.1f} ms ({phase})")
        if state["count"] == s.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if state["count"] >= total:
            raise _Stop
        state["last"] = timers.now()
        state["cpu"] = time.process_time()

    try:
        loop.run(on_step)
    except _Stop:
        pass
    health["rollbacks"] = loop.state.rollbacks
    timers.enabled = True
    peak_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    floor = _floor(loop, captured["latents"], captured["images"], max(1, min(s.iters, 10)), timers)
    unet_floor = sum(v for k, v in floor.items() if k != "vae_encode_fwd_bwd")
    it = _quantiles(iteration_ms)
    mean_total = statistics.fmean(instrumented_ms)
    breakdown = {k: statistics.fmean(p.get(k, 0.0) for p in parts) for k in PARTS}
    breakdown["other"] = mean_total - sum(breakdown.values())
    flops = _counted_flops(s, bench.settings, floor)
    paper_iters = PAPER_ITERATIONS[s.stage]
    preset_iters = len(loop.plan)
    result = {
        "settings": bench.settings,
        "fast_path": bench.fast_path,
        "memory_fallbacks": bench.memory_fallbacks,
        "numerics": health,
        "iterations_timed": len(iteration_ms),
        "warmup": s.warmup,
        "build_seconds": build_s,
        "iteration_ms": it,
        "instrumented_ms": _quantiles(instrumented_ms),
        "instrumented_mean_ms": mean_total,
        "iteration_cpu_ms": _quantiles(cpu_ms),
        "breakdown_ms": breakdown,
        "floor_ms": floor,
        "unet_floor_ms": unet_floor,
        "ratio_to_floor": it["median"] / unet_floor if unet_floor > 0 else math.nan,
        "ratio_to_floor_with_vae": it["median"] / (unet_floor + floor.get("vae_encode_fwd_bwd", 0.0)),
        "peak_gpu_gb": peak_gb,
        "counted_tflop": flops,
        "paper_iterations": paper_iters,
        "projected_paper_s": it["median"] * paper_iters / 1e3,
        "preset_iterations": preset_iters,
        "projected_preset_s": it["median"] * preset_iters / 1e3,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
    }
    return result


def _counted_flops(s: BenchSettings, settings: dict[str, Any], floor: dict[str, float]) -> dict[str, float] | None:
    """TFLOP per iteration of the floor's passes, counted on the meta device, and the rate the
    floor achieved; None for the tiny architecture (its cost is all overhead)."""
    if s.arch not in arch_mod.ARCHS:
        return None
    latent = int(settings["latent"].split("x")[0])
    views = settings["views"]
    per = arch_mod.pass_flops(s.arch, latent, latent * 8)
    trained = "trained" in settings["score_model"]
    # A frozen layer's backward only needs its input's gradient: about one more forward.
    unet = views * per["unet_forward"] * (2 + (1 + 2 if trained else 0))
    vae = views * per["vae_encode_forward"] * 2
    unet_s = sum(v for k, v in floor.items() if k != "vae_encode_fwd_bwd") / 1e3
    return {"unet": unet / 1e12, "vae": vae / 1e12,
            "unet_tflop_per_s": unet / 1e12 / unet_s if unet_s > 0 else math.nan,
            "vae_tflop_per_s": vae / 1e12 / (floor["vae_encode_fwd_bwd"] / 1e3) if floor.get("vae_encode_fwd_bwd") else math.nan}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(r: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    st = r["settings"]
    it = r["iteration_ms"]
    lines = [
        f"{st['name']} | arch {st['arch']} ({st['unet_params_m']} M UNet params, {st['dtype']}) | {r['device_name']} | preset {st['preset']}",
        "settings: " + ", ".join(f"{k} {v}" for k, v in st.items() if k not in ("name", "arch", "device", "preset", "dtype", "stage", "unet_params_m")),
        f"fast path: {', '.join(r['fast_path']) or 'none'}; memory fallbacks used: {', '.join(r['memory_fallbacks']) or 'none'}",
        f"numerics (all iterations): {r['numerics']['rollbacks']} NaN rollbacks, {r['numerics']['nonfinite_steps']} non-finite steps",
        "",
        f"{'iteration (ms)':<40}{'median':>10}{'p10':>10}{'p90':>10}{'min':>10}{'max':>10}",
        f"{'':<40}{it['median']:>10.1f}{it['p10']:>10.1f}{it['p90']:>10.1f}{it['min']:>10.1f}{it['max']:>10.1f}",
        f"{'  process CPU time (ms, all threads)':<40}{r['iteration_cpu_ms']['median']:>10.1f}{r['iteration_cpu_ms']['p10']:>10.1f}"
        f"{r['iteration_cpu_ms']['p90']:>10.1f}{r['iteration_cpu_ms']['min']:>10.1f}{r['iteration_cpu_ms']['max']:>10.1f}",
        f"{'  timed per part (the breakdown run)':<40}{r['instrumented_ms']['median']:>10.1f}{r['instrumented_ms']['p10']:>10.1f}"
        f"{r['instrumented_ms']['p90']:>10.1f}{r['instrumented_ms']['min']:>10.1f}{r['instrumented_ms']['max']:>10.1f}",
        f"({r['iterations_timed']} plain iterations, then as many timed per part, after {r['warmup']} warm-up)",
        "",
        f"{'breakdown (mean ms per iteration)':<40}{'ms':>10}{'share':>10}",
    ]
    mean = r["instrumented_mean_ms"]
    for key, label in list(PARTS.items()) + [("other", "other (loop, NaN guard, snapshots, glue)")]:
        v = r["breakdown_ms"][key]
        lines.append(f"{label:<40}{v:>10.1f}{100 * v / mean:>9.1f}%")
    lines += ["", f"{'floor (UNet passes alone, median ms)':<40}{'ms':>10}"]
    for key, v in r["floor_ms"].items():
        lines.append(f"  {key:<38}{v:>10.1f}")
    lines += [
        f"{'UNet floor':<40}{r['unet_floor_ms']:>10.1f}",
        f"{'iteration / UNet floor':<40}{r['ratio_to_floor']:>10.2f}",
        f"{'iteration / (UNet + VAE floor)':<40}{r['ratio_to_floor_with_vae']:>10.2f}",
        *([] if r["counted_tflop"] is None else [
            f"{'counted TFLOP/iteration: UNet, VAE':<40}{r['counted_tflop']['unet']:>10.2f}{r['counted_tflop']['vae']:>10.2f}",
            f"{'floor rate TFLOP/s: UNet, VAE':<40}{r['counted_tflop']['unet_tflop_per_s']:>10.2f}{r['counted_tflop']['vae_tflop_per_s']:>10.2f}"]),
        f"{'peak GPU memory (GiB)':<40}{'-' if r['peak_gpu_gb'] is None else format(r['peak_gpu_gb'], '.2f'):>10}",
        f"{'projected stage time (paper, ' + str(r['paper_iterations']) + ' it)':<40}{_hms(r['projected_paper_s']):>10}",
    ]
    if st["preset"] != "paper":
        lines.append(f"{'projected stage time (preset, ' + str(r['preset_iterations']) + ' it)':<40}{_hms(r['projected_preset_s']):>10}")
    return "\n".join(lines)


def stage_settings(s: BenchSettings) -> list[BenchSettings]:
    """The runs ``s`` asks for: itself, or with ``stage="all"`` every stage, each with its own
    real architecture (SD 2.1 for stages 1-2, the SDXL refiner for stage 3) unless ``tiny``."""
    if s.stage != "all":
        return [s]
    real = {"1": "sd21", "2a": "sd21", "2b": "sd21", "3": "sdxl-refiner"}
    return [replace(s, stage=st, arch="tiny" if s.arch == "tiny" else real[st]) for st in STAGES]


def format_pipeline(results: list[dict[str, Any]]) -> str:
    """The whole pipeline at the paper's iteration counts: each stage's projection and the sum."""
    lines = [f"{'pipeline (paper iterations)':<28}{'arch':>14}{'ms/it':>10}{'ratio':>8}{'peak GiB':>10}{'projected':>12}"]
    for r in results:
        st = r["settings"]
        peak = "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.2f}"
        lines.append(f"{st['name'] + ' x' + str(r['paper_iterations']):<28}{st['arch']:>14}{r['iteration_ms']['median']:>10.1f}"
                     f"{r['ratio_to_floor']:>8.2f}{peak:>10}{_hms(r['projected_paper_s']):>12}")
    total = sum(r["projected_paper_s"] for r in results)
    lines.append(f"{'projected full pipeline':<70}{_hms(total):>12}")
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    """Command-line settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES + ("all",), default="1",
                   help="all: every stage with its real architecture (or tiny) and the projected pipeline time")
    p.add_argument("--arch", choices=arch_mod.ARCH_NAMES, default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--preset", choices=("paper", "preview", "smoke"), default="paper")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="plain path: float32, unfused attention, text encoder kept")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--phi-base", choices=("shared", "separate"), default="shared")
    p.add_argument("--ray-chunk", default="auto", help="stage 1: auto, none, or rays per checkpointed chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting by dotted path, e.g. --set stage1.samples_per_ray=128")
    p.add_argument("--workdir", default=None, help="folder for the tiny pipelines (default: a new temporary one)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")
    s = BenchSettings(a.stage, a.arch, a.device, a.iters, a.warmup, a.preset, a.fast, a.dtype, a.phi_base,
                      a.ray_chunk, a.compile, a.seed, a.workdir,
                      parse_cli_overrides(a.overrides) or None)
    s.json_out = a.json_out  # type: ignore[attr-defined]
    return s


def main(argv: list[str] | None = None) -> int:
    """Run the stage's benchmark (or every stage's) and print the tables."""
    s = parse_args(argv)
    runs = stage_settings(s)
    results = []
    for run in runs:
        results.append(run_bench(run, log=lambda m: print(m, file=sys.stderr, flush=True)))
        print(format_table(results[-1]), end="\n\n" if len(runs) > 1 else "\n", flush=True)
    if len(runs) > 1:
        print(format_pipeline(results))
    out = getattr(s, "json_out", None)
    if out:
        data = [{"bench_settings": asdict(run), **r} for run, r in zip(runs, results)]
        Path(out).write_text(json.dumps(data if len(runs) > 1 else data[0], indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
