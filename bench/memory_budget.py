"""What an iteration holds in accelerator memory at its peak, counted without an accelerator.

The issue's memory targets (stages 1 and 2 within 24 GB at the paper's settings, stage 3 within
40 GB) are about the largest terms of an iteration, and those can be counted tensor by tensor:

- the weights on the device (UNet and VAE in the fast path's dtype; the text encoder waits on the
  CPU between prompt embeddings; with ``--phi-base separate`` the paper's second UNet too, and
  its text encoder while D_phi's prompt is first embedded);
- the LoRA adapter with its gradient and AdamW moments, the 3D parameters with theirs, and the
  loop's rollback snapshot of them (two while it is renewed);
- the tensors autograd saves for backward: the VAE encode of the render (alive until the step's
  backward), the LoRA update's pass through the UNet (alive during the update), and the 3D render.

The terms are added up although not all are alive at once (stage 1's chunk graph exists only in
the render's backward, after the VAE's tensors are freed), so the sum is an upper bound of them.
The diffusion terms are counted on the meta device with the real architectures (shapes only: no
memory, no time). Attention is counted as the fused kernels the fast path uses on a GPU keep it
(inputs, output and one float32 log-sum-exp per query), not as the meta device's reference
implementation, which would keep every attention matrix. The 3D terms come from a real render at
the paper's settings on the CPU with the pure-PyTorch rasteriser and hash grid (what a GPU without
nvdiffrast and tinycudann keeps; those keep less). Stage 1's training render runs in
checkpointed ray chunks sized to a quarter of the card (pipeline/memory_plan.py), so its term is
that budget. Not counted, so compared against the card with 15 % headroom: the CUDA context,
cuBLAS/cuDNN workspaces, the allocator's fragmentation, and transient temporaries.

    .venv/bin/python bench/memory_budget.py            # all stages, the issue's cards
    .venv/bin/python bench/memory_budget.py --stage 3 --card-gb 40 --phi-base separate
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.memory_budget from the repo root
    from . import arch as arch_mod
    from .iteration import STAGE_NAMES, BenchSettings, build_stage
except ImportError:  # pragma: no cover - script mode
    import arch as arch_mod  # type: ignore[no-redef]
    from iteration import STAGE_NAMES, BenchSettings, build_stage  # type: ignore[no-redef]

from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.memory_plan import BYTES_PER_SAMPLE_PER_LEVEL, plan_ray_chunk

GIB = 2 ** 30
#: The issue's targets: a consumer card for stages 1-2, a 40 GB card for stage 3.
CARD_GB = {"1": 24, "2a": 24, "2b": 24, "3": 40}
HEADROOM = 0.15
#: The diffusion model each stage distils from, its latent size and the size its VAE encodes.
DIFFUSION = {"1": ("sd21", 64, 512), "2a": ("sd21", 64, 512), "2b": ("sd21", 64, 512), "3": ("sdxl-refiner", 128, 1024)}
STAGE_CONFIG = {"1": "stage1", "2a": "geometry", "2b": "texture", "3": "refine"}


@dataclass
class Row:
    """One term of the count."""

    what: str
    bytes: int
    how: str


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> tuple[Any, int]:
    """Run ``fn`` and count the distinct storages autograd saves for backward, minus ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


class _FusedAttentionMemory(torch.autograd.Function):
    """Scaled dot-product attention with what a fused (flash / memory-efficient) kernel keeps for
    backward: q, k, v, the output and a float32 log-sum-exp per query. Counting only (meta)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextmanager
def fused_attention_counting() -> Iterator[None]:
    """Swap torch's SDPA for the counting stand-in while diffusers' attention calls it."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return _FusedAttentionMemory.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def diffusion_rows(arch: str, latent: int, image: int, dtype: torch.dtype, lora: bool, separate_phi: bool,
                   lora_rank: int = 4) -> list[Row]:
    """Weights, adapter state and saved activations of the diffusion passes, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    spec = arch_mod.ARCHS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet).to(dtype).requires_grad_(False)
        vae = AutoencoderKL(**spec.vae)
    # As the prior does: a VAE whose config asks for it stays float32 under float16.
    vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
    vae = vae.to(vae_dtype).requires_grad_(False)
    rows = [Row("UNet weights", _nbytes(unet.parameters()), f"{arch}, {str(dtype)[6:]}"),
            Row("VAE weights", _nbytes(vae.parameters()), str(vae_dtype)[6:])]
    if separate_phi:
        from transformers import CLIPTextConfig, CLIPTextModel

        rows.append(Row("D_phi's separate UNet (SD 2.1-v)", _nbytes(unet.parameters()), "paper layout"))
        with torch.device("meta"):
            text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text)).to(dtype)
        rows.append(Row("D_phi base's text encoder (first step)", _nbytes(text_encoder.parameters()),
                        "while its prompt is first embedded, then offloaded"))
    frozen = {_storage_key(p) for p in list(unet.parameters()) + list(vae.parameters())}
    with fused_attention_counting():
        image_in = torch.zeros(1, 3, image, image, device="meta", dtype=vae_dtype, requires_grad=True)
        _, vae_saved = saved_bytes(lambda: vae.encode(image_in).latent_dist.mean, frozen)
        rows.append(Row("VAE encode, saved for backward", vae_saved, f"{image} px render, until the step's backward"))
        if lora:
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="phi")
            adapter = [p for n, p in unet.named_parameters() if ".phi." in n]
            for p in adapter:
                p.data = p.data.float()  # as LoraScoreModel: the adapter trains in float32
                p.requires_grad_(True)
            # parameter, gradient and AdamW's two moments
            rows.append(Row("LoRA adapter + gradient + AdamW", 4 * _nbytes(adapter), f"rank {lora_rank}, float32"))
            frozen |= {_storage_key(p) for p in adapter}
            args, kwargs = arch_mod.meta_unet_inputs(arch, latent, dtype)
            _, update_saved = saved_bytes(lambda: unet(*args, **kwargs).sample, frozen)
            rows.append(Row("LoRA update, saved for backward", update_saved, f"{latent}x{latent} latents, during the update"))
    return rows


def render_rows(stage: str, card_gb: float) -> list[Row]:
    """3D parameters with their optimiser state, and the training render's saved tensors."""
    job = build_config("paper")
    cfg = getattr(job, STAGE_CONFIG[stage])
    bench = build_stage(BenchSettings(stage=stage, arch="tiny", device="cpu", preset="paper", iters=1, warmup=0))
    loop = bench.loop
    params = [p for g in loop.optimiser.param_groups for p in g["params"]]
    rows = [Row("3D parameters + gradient + AdamW", 4 * _nbytes(params), f"{sum(p.numel() for p in params) / 1e6:.1f} M float32"),
            # Distillation._snapshot deep-copies parameters and AdamW moments on the device; the
            # old copy lives until the new one is made.
            Row("rollback snapshot (two while renewed)", 2 * 3 * _nbytes(params), "parameters + AdamW moments")]
    if stage == "1":
        rays = cfg.views_per_iteration * cfg.resolution ** 2
        budget = int(card_gb * GIB / 4)
        chunk = plan_ray_chunk(rays, cfg.samples_per_ray, cfg.grid.levels, budget)
        rays_held = rays if chunk is None else chunk
        # The planner's per-sample bytes sit above the measured ones (tests/bench/test_memory.py).
        held = rays_held * cfg.samples_per_ray * cfg.grid.levels * BYTES_PER_SAMPLE_PER_LEVEL
        rows.append(Row("NeRF render graph (checkpointed chunk)" if chunk else "NeRF render graph", held,
                        f"{rays_held} of {rays} rays x {cfg.samples_per_ray} samples, planned within a quarter of the card"))
        return rows
    cams = loop.cameras.sample(cfg.views_per_iteration)
    exclude = {_storage_key(p) for p in params}
    _, render_saved = saved_bytes(lambda: loop.problem.render(cams), exclude)
    rows.append(Row("render, saved for backward", render_saved, f"{cfg.resolution} px, measured on the CPU"))
    return rows


def count(stage: str, card_gb: float | None = None, dtype: str = "bfloat16", phi_base: str = "shared") -> dict[str, Any]:
    """All terms of one stage's peak and the verdict against its card."""
    card = float(card_gb if card_gb is not None else CARD_GB[stage])
    arch, latent, image = DIFFUSION[stage]
    lora = stage != "2a"
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    rows = diffusion_rows(arch, latent, image, torch_dtype, lora, separate_phi=lora and phi_base == "separate" and stage != "3")
    rows += render_rows(stage, card)
    result = {"stage": stage, "name": STAGE_NAMES[stage], "arch": arch, "dtype": dtype, "phi_base": phi_base,
              "rows": [vars(r) for r in rows], "total_bytes": sum(r.bytes for r in rows)}
    return against_card(result, card)


def against_card(result: dict[str, Any], card_gb: float) -> dict[str, Any]:
    """The count judged against a card of ``card_gb`` (less the headroom for what is not counted)."""
    limit = int(card_gb * GIB * (1.0 - HEADROOM))
    return {**result, "card_gb": card_gb, "limit_bytes": limit, "fits": result["total_bytes"] <= limit}


def format_table(r: dict[str, Any]) -> str:
    """One stage's count as a plain-text table."""
    lines = [f"{r['name']} | {r['arch']} in {r['dtype']} | D_phi base {r['phi_base']} | card {r['card_gb']:g} GB",
             f"{'term':<40}{'GiB':>9}  how"]
    for row in r["rows"]:
        lines.append(f"{row['what']:<40}{row['bytes'] / GIB:>9.2f}  {row['how']}")
    lines.append(f"{'counted peak':<40}{r['total_bytes'] / GIB:>9.2f}  against {r['limit_bytes'] / GIB:.1f} GiB "
                 f"({100 * (1 - HEADROOM):.0f} % of the card): {'fits' if r['fits'] else 'DOES NOT FIT'}")
    return "\n".join(lines)


def pipeline_peak(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole pipeline's counted peak: the largest stage's, since stage 3 loads the refiner only
    after stages 1-2's models are released (components.release_diffusion_models; pinned by
    tests/hub/test_memory_between_stages.py). Also what it would be if they were kept."""
    largest = max(results, key=lambda r: r["total_bytes"])
    early = [r for r in results if r["stage"] != "3"]
    kept = 0
    if any(r["stage"] == "3" for r in results) and early:
        weights = max(sum(row["bytes"] for row in r["rows"] if "weights" in row["what"] or "separate UNet" in row["what"])
                      for r in early)
        kept = next(r for r in results if r["stage"] == "3")["total_bytes"] + weights
    return {"peak_bytes": largest["total_bytes"], "largest_stage": largest["stage"], "if_kept_bytes": kept}


def main(argv: list[str] | None = None) -> int:
    """Command line: count the stages, print the tables, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=tuple(DIFFUSION), action="append", help="default: every stage")
    p.add_argument("--card-gb", type=float, default=None, help="default: 24 for stages 1-2, 40 for stage 3")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--phi-base", choices=("shared", "separate"), default="shared")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    results = [count(s, a.card_gb, a.dtype, a.phi_base) for s in (a.stage or list(DIFFUSION))]
    print("\n\n".join(format_table(r) for r in results))
    if len(results) > 1:
        whole = pipeline_peak(results)
        line = (f"\nwhole pipeline: {whole['peak_bytes'] / GIB:.2f} GiB, the largest stage's ({whole['largest_stage']}): "
                f"stages 1-2's models are released before the refiner loads")
        if whole["if_kept_bytes"]:
            line += f" (kept alive beside it, they would make it {whole['if_kept_bytes'] / GIB:.2f} GiB)"
        print(line)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(results, indent=2))
    return 0 if all(r["fits"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
