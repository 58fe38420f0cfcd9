"""Before and after of each fast-path switch, on the diffusion passes of the real architecture.

The switches of ``dreamflow.fastpath.FastPath`` are turned on one at a time, cumulatively, on a
prior of the real architecture with random weights (bench/arch.py): unfused float32 attention (the
baseline), SDPA attention, channels-last, TF32 (CUDA only), half precision (bf16 where the device
has it), and with ``--compile`` torch.compile of the UNet. Each row times the three diffusion
passes an iteration makes (the guided prior pass with cond and uncond batched, the LoRA update's
forward + backward + AdamW step, the VAE encode forward + backward to the render) on the same
inputs, and says how far the row's guided estimate moved from the baseline's (the price in
precision).

    .venv/bin/python bench/switches.py --arch sd21 --device cuda --repeats 20 --compile
    .venv/bin/python bench/switches.py --arch tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.switches from the repo root
    from . import arch as arch_mod
    from .iteration import Timers
except ImportError:  # pragma: no cover - script mode
    import arch as arch_mod  # type: ignore[no-redef]
    from iteration import Timers  # type: ignore[no-redef]

from dreamflow.fastpath import FastPath, apply_fast_path, choose_dtype
from dreamflow.priors.score_models import LoraScoreModel
from dreamflow.scene.cameras import Cameras

#: Image size the prior encodes and the latent size it denoises, per architecture (the paper's).
SIZES = {"tiny": (64, 8), "sd21": (512, 64), "sdxl-refiner": (1024, 128)}


@dataclass(frozen=True)
class Row:
    """One rung of the ladder: a label and the switches that are on."""

    label: str
    fast: FastPath


def ladder(device: torch.device, compile_unet: bool) -> list[Row]:
    """The switches, cumulatively, in the order a user would turn them on."""
    base = FastPath(dtype="float32", sdpa=False, offload_text_encoder=False)
    rows = [Row("float32, unfused attention (baseline)", base)]
    rows.append(Row("+ SDPA attention", replace(rows[-1].fast, sdpa=True)))
    rows.append(Row("+ channels-last", replace(rows[-1].fast, channels_last=True)))
    if device.type == "cuda":
        rows.append(Row("+ TF32", replace(rows[-1].fast, tf32=True)))
    half = "bfloat16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "float16"
    rows.append(Row(f"+ {half}", replace(rows[-1].fast, dtype=half)))
    if compile_unet:
        rows.append(Row("+ torch.compile (UNet)", replace(rows[-1].fast, compile_unet=True)))
    return rows


def measure(arch: str, device: str, repeats: int = 3, warmup: int = 1, compile_unet: bool = False,
            seed: int = 0, workdir: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the three diffusion passes under each rung of the ladder; the results as a dict."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available on this machine")
    image_size, latent_size = SIZES[arch]
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, image_size, image_size, generator=g).to(dev)
    noise = torch.randn(1, 4, latent_size, latent_size, generator=g).to(dev)
    cams = Cameras.make([30.0], [15.0], 2.0, 40.0).to(dev)
    timers = Timers(dev)
    rows, baseline, priors = [], None, {}
    for row in ladder(dev, compile_unet):
        dtype = choose_dtype(dev, row.fast.dtype)
        if dtype not in priors:  # one prior per precision, same seed: the same weights, cast
            priors.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            priors[dtype] = arch_mod.build_prior(arch, dev, dtype, encode_size=image_size, seed=seed, workdir=workdir)
        prior = priors[dtype]
        applied = apply_fast_path(prior, row.fast, dev)
        cond = prior.condition("a DSLR photo of a delicious hamburger")
        with torch.no_grad():
            latents = prior.encode(images)
        sigma = prior.sigma(0.5).to(dev)
        noisy = latents + sigma * noise
        phi = LoraScoreModel(prior, rank=4, lr=1e-4, seed=seed)

        def vae() -> None:
            leaf = images.clone().requires_grad_(True)
            prior.encode(leaf).sum().backward()

        try:
            result = {
                "label": row.label, "applied": applied, "dtype": str(dtype).replace("torch.", ""),
                "prior_unet_ms": timers.median_ms(lambda: prior.denoise(noisy, sigma, cond, cams), warmup, repeats),
                "lora_update_ms": timers.median_ms(lambda: phi.update(latents, sigma, cond, cams), warmup, repeats),
                "vae_encode_fwd_bwd_ms": timers.median_ms(vae, warmup, repeats),
            }
            estimate = prior.denoise(noisy, sigma, cond, cams).float()
        finally:
            phi.close()
        if baseline is None:
            baseline = estimate
        result["rel_diff_to_baseline"] = float((estimate - baseline).norm() / baseline.norm())
        result["total_ms"] = result["prior_unet_ms"] + result["lora_update_ms"] + result["vae_encode_fwd_bwd_ms"]
        rows.append(result)
        if log is not None:
            log(f"  {row.label}: {result['total_ms']:.1f} ms")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"arch": arch, "device": device, "device_name": name, "image_size": image_size,
            "latent_size": latent_size, "repeats": repeats, "warmup": warmup, "rows": rows,
            "torch": torch.__version__}


def format_table(r: dict[str, Any]) -> str:
    """The ladder as a plain-text table: each pass's median ms, and the speed-up per rung."""
    lines = [f"fast-path switches | arch {r['arch']} (image {r['image_size']}, latent {r['latent_size']}) | "
             f"{r['device_name']} | median of {r['repeats']} after {r['warmup']} warm-up",
             f"{'switch':<40}{'prior':>9}{'LoRA upd':>10}{'VAE f+b':>9}{'total':>9}{'x prev':>8}{'x base':>8}{'rel diff':>10}"]
    rows = r["rows"]
    for i, row in enumerate(rows):
        prev = rows[i - 1]["total_ms"] if i else row["total_ms"]
        lines.append(f"{row['label']:<40}{row['prior_unet_ms']:>9.1f}{row['lora_update_ms']:>10.1f}"
                     f"{row['vae_encode_fwd_bwd_ms']:>9.1f}{row['total_ms']:>9.1f}{prev / row['total_ms']:>8.2f}"
                     f"{rows[0]['total_ms'] / row['total_ms']:>8.2f}{row['rel_diff_to_baseline']:>10.1e}")
    lines.append("ms per pass; 'rel diff': relative change of the guided estimate against the baseline row")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the ladder, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("tiny",) + tuple(arch_mod.ARCHS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="add a torch.compile rung (minutes of compiling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    r = measure(a.arch, a.device, a.repeats, a.warmup, a.compile, a.seed, log=lambda m: print(m, file=sys.stderr))
    print(format_table(r))
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
