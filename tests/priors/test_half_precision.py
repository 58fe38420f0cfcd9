"""The half-precision path the GPU takes (bf16 on Hopper/Ampere, fp16 before), run on CPU with the
same tiny weights: the prior's guided estimate, D_phi and the VAE agree with float32 to half
precision, the LoRA adapter trains in float32, and the gradient reaches a float32 render.
And what bfloat16 costs on a CPU: where it has no bf16 instructions it is emulated (the issue
measured ~70x slower than float32 on an AVX2 EPYC); it still runs, with a one-line warning."""

import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from dreamflow import devices
from dreamflow.priors.latent_diffusion import pick_dtype
from dreamflow.priors.score_models import LoraScoreModel
from dreamflow.priors.sdxl_refiner import SdxlRefinerPrior
from dreamflow.priors.stable_diffusion import StableDiffusionPrior
from dreamflow.scene.cameras import Cameras

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative error allowed against float32: a few dozen roundings of the format's precision (bf16
# keeps 8 mantissa bits, fp16 11), which classifier-free guidance at 7.5 amplifies.
TOLERANCE = {dtype: 20 * torch.finfo(t).eps for dtype, t in HALF.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _check_against_float32(cls, folder, dtype: str, image_size: int):
    tol = TOLERANCE[dtype]
    full = cls.from_pretrained(str(folder), local_files_only=True, dtype="float32")
    half = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    assert half.dtype == HALF[dtype] and next(half.unet.parameters()).dtype == HALF[dtype]
    cams = Cameras.make([0.0, 100.0], [10.0, 30.0], 1.2, 50.0)
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, image_size, image_size, generator=g)
    sigma = torch.tensor([2.0, 0.5])
    n = torch.randn(2, 4, image_size // 8, image_size // 8, generator=g)

    # The render stays float32; only the frozen networks run in half precision.
    render = image.clone().requires_grad_(True)
    latents = half.encode(render)
    assert latents.dtype == torch.float32
    assert _rel(latents, full.encode(image)) < tol
    (latents ** 2).sum().backward()
    assert render.grad.dtype == torch.float32 and torch.isfinite(render.grad).all() and render.grad.abs().sum() > 0

    x = latents.detach() + sigma.view(-1, 1, 1, 1) * n
    d_full = full.denoise(x, sigma, full.condition("a red chair"), cams)
    d_half = half.denoise(x, sigma, half.condition("a red chair"), cams)
    assert d_half.dtype == torch.float32 and _rel(d_half, d_full) < tol

    # D_phi on the half-precision UNet: adapter weights in float32, a finite update, and the
    # adapted estimate still tracks float32 after the same update on both.
    phis = [LoraScoreModel(p, rank=4, lr=1e-2, seed=3) for p in (full, half)]
    assert all(w.dtype == torch.float32 for w in phis[1].lora_params.values())
    # Loss scaling where the UNet is float16 only (bf16 has float32's exponent range).
    assert phis[1].scaler.is_enabled() == (dtype == "float16") and not phis[0].scaler.is_enabled()
    losses = [phi.update(latents.detach(), sigma, phi.prior.condition("a red chair"), cams) for phi in phis]
    losses = [float(loss) for loss in losses]
    assert all(math.isfinite(loss) for loss in losses)
    assert abs(losses[1] - losses[0]) < tol * losses[0]
    outs = [phi.denoise(x, sigma, phi.prior.condition("a red chair"), cams) for phi in phis]
    assert _rel(outs[1], outs[0]) < tol
    return half


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stable_diffusion_in_half_precision_tracks_float32(tiny_sd_v, dtype):
    _check_against_float32(StableDiffusionPrior, tiny_sd_v, dtype, 32)


def test_refiner_in_float16_keeps_its_vae_in_float32(tiny_refiner):
    """The SDXL VAE overflows in float16 (its config says force_upcast); the UNet need not."""
    half = _check_against_float32(SdxlRefinerPrior, tiny_refiner, "float16", 32)
    assert half.vae_dtype == torch.float32 and next(half.vae.parameters()).dtype == torch.float32


def test_float16_lora_update_scales_its_loss_at_the_real_latent_size(tiny_sd_v):
    """At SD's 64x64 latents the denoising loss's gradients are small enough to underflow in fp16
    activations (measured on this tiny UNet: 10 % gradient error, entries flushed to zero,
    without scaling); the update's loss scaling keeps the adapter's gradient at float32's."""
    cond_prompt = "a red chair"
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    sigma = torch.tensor([0.3])
    grads, init = [], None
    for dtype in ("float32", "float16"):
        prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_v), local_files_only=True, dtype=dtype)
        phi = LoraScoreModel(prior, rank=4, lr=1e-3, seed=5)
        with torch.no_grad():  # the same adapter in both, with B non-zero so that A has a gradient
            if init is None:
                g = torch.Generator().manual_seed(1)
                init = {n: (p.normal_(0.0, 0.01, generator=g) if "lora_B" in n else p).detach().clone()
                        for n, p in phi.lora_params.items()}
            for n, p in phi.lora_params.items():
                p.copy_(init[n])
        phi.update(x, sigma, prior.condition(cond_prompt))
        grads.append(torch.cat([p.grad.flatten() for p in phi.lora_params.values()]))
    assert torch.isfinite(grads[1]).all()
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.01


def test_float16_lora_update_retried_after_out_of_memory_steps_like_a_clean_one(tiny_sd_eps):
    """The loop retries a step that ran out of memory; if that happened inside the adapter's
    optimiser step (AdamW allocating its state), the retry must not see gradients still scaled."""
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True, dtype="float16")
    cond = prior.condition("a red chair")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    sigma = torch.tensor([0.5])

    def gradient_adamw_sees(out_of_memory_first: bool) -> float:
        torch.manual_seed(0)
        phi = LoraScoreModel(prior, rank=4, lr=1e-3, seed=5)
        seen, real_step = {}, phi.optimiser.step

        def step(*args, **kwargs):
            seen["grad"] = float(torch.cat([p.grad.flatten().float() for p in phi.lora_params.values()
                                            if p.grad is not None]).norm())
            if out_of_memory_first and "raised" not in seen:
                seen["raised"] = True
                raise torch.OutOfMemoryError("out of memory (simulated, inside AdamW's first step)")
            return real_step(*args, **kwargs)

        phi.optimiser.step = step
        if out_of_memory_first:
            with pytest.raises(torch.OutOfMemoryError):
                phi.update(x, sigma, cond)
        phi.generator.manual_seed(5)
        phi.update(x, sigma, cond)
        phi.close()
        return seen["grad"]

    clean = gradient_adamw_sees(False)
    assert gradient_adamw_sees(True) == pytest.approx(clean, rel=1e-3)


# -- bfloat16 on a CPU ---------------------------------------------------------------------------
@pytest.mark.parametrize("capability, flags, isa_limit, native", [
    ("AVX512", {"avx512f", "avx512_bf16"}, "", True),
    ("AVX512", {"avx512f", "amx_bf16"}, "", True),
    ("AVX512", {"avx512f"}, "", False),                    # AVX-512 without its bf16 extension
    ("AVX2", {"avx2", "avx512_bf16"}, "", False),          # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU
    ("AVX512", {"avx512f", "avx512_bf16"}, "AVX2", False),  # oneDNN held to AVX2
    ("AVX512", {"avx512f", "avx512_bf16"}, "AVX512_CORE_BF16", True),
    ("DEFAULT", set(), "", False),
])
def test_native_bf16_follows_the_capability_pytorch_uses_and_the_cpu_flags(monkeypatch, capability, flags,
                                                                          isa_limit, native):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_limit)
    assert devices.cpu_has_native_bf16() is native


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert devices._cpu_flags(x86) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert "bf16" in devices._cpu_flags(arm)
    assert devices._cpu_flags(tmp_path / "absent") == set()


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_one_warning(monkeypatch, caplog, tiny_sd_eps):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(devices, "_warned_slow_bf16", set())
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=devices.__name__):
        assert pick_dtype("auto", cpu) == torch.float32 and pick_dtype("float32", cpu) == torch.float32
        assert caplog.records == []
        prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True, dtype="bfloat16")
        again = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True, dtype="bfloat16")
    assert prior.dtype == again.dtype == torch.bfloat16
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prior.denoise(x, torch.tensor([1.0]), prior.condition("a red chair"))).all()
    [warning] = caplog.records  # once per process, however many models load
    text = warning.getMessage()
    assert "\n" not in text and "no native bf16" in text and "70x slower than float32" in text
    assert "auto or float32" in text


def test_explicit_bf16_on_a_cpu_with_native_bf16_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(devices, "_warned_slow_bf16", set())
    with caplog.at_level(logging.WARNING, logger=devices.__name__):
        assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert caplog.records == []


def test_aten_cpu_capability_avx2_stands_for_a_cpu_without_bf16():
    """How the slow machine is approximated on a fast one: the process sees no native bf16 and warns
    in one line on stderr, once."""
    code = ("import torch; from dreamflow import devices; from dreamflow.priors.latent_diffusion import pick_dtype;"
            "print(devices.cpu_has_native_bf16());"
            "print(pick_dtype('bfloat16', torch.device('cpu')), pick_dtype('bfloat16', torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "torch.bfloat16", "torch.bfloat16"]
    assert len(done.stderr.strip().splitlines()) == 1 and "(AVX2, no native bf16)" in done.stderr
