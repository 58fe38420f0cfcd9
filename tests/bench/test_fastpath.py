"""Each fast-path switch gives the plain path's numbers (checked on CPU; the speed is a GPU matter)."""

from __future__ import annotations

import math

import torch

from dreamflow.fastpath import (FastPath, OffloadedTextConditioner, apply_fast_path, choose_dtype, for_device,
                                set_sdpa, uses_sdpa)
from dreamflow.priors.score_models import LoraScoreModel


def _denoise(prior, seed=0):
    cond = prior.condition("a red chair", "", 7.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=g)
    return prior.denoise(x, prior.sigma(0.6), cond)


def test_sdpa_and_unfused_attention_agree(tiny_prior):
    assert set_sdpa(tiny_prior.unet, fused=False) and not uses_sdpa(tiny_prior.unet)
    plain = _denoise(tiny_prior)
    assert set_sdpa(tiny_prior.unet, fused=True) and uses_sdpa(tiny_prior.unet)
    fused = _denoise(tiny_prior)
    # Float32 reassociation only (outputs are O(1), scaled by sigma in D = x - sigma * eps).
    assert torch.allclose(plain, fused, atol=1e-4, rtol=1e-4)
    assert not torch.equal(plain, torch.zeros_like(plain))


def test_channels_last_agrees_for_denoise_encode_and_lora_update(tiny_prior):
    images = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    before = (_denoise(tiny_prior), tiny_prior.encode(images))
    applied = apply_fast_path(tiny_prior, FastPath(channels_last=True), "cpu")
    assert "channels-last-unet" in applied and "channels-last-vae" in applied
    assert tiny_prior.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    after = (_denoise(tiny_prior), tiny_prior.encode(images))
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    model = LoraScoreModel(tiny_prior, seed=0)
    cond = tiny_prior.condition("a red chair")
    loss = model.update(before[1], tiny_prior.sigma(0.5), cond)
    assert math.isfinite(float(loss))


def test_recomputation_savers_keep_the_gradients(tiny_prior):
    """VAE-encoder and UNet activation recomputation (the memory fallbacks) change memory only."""
    images = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(2))

    def encode_grad():
        leaf = images.clone().requires_grad_(True)
        (tiny_prior.encode(leaf) ** 2).sum().backward()
        return leaf.grad

    def lora_after_update():
        torch.manual_seed(5)  # peft draws the LoRA A matrices from the global generator
        model = LoraScoreModel(tiny_prior, seed=3, adapter_name="recompute_check")
        latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(4))
        loss = model.update(latents, tiny_prior.sigma(0.5), tiny_prior.condition("a red chair"))
        return loss, [p.detach().clone() for p in model.lora_params.values()]

    g0, (l0, w0) = encode_grad(), lora_after_update()
    applied = apply_fast_path(tiny_prior, FastPath(vae_gradient_checkpointing=True, unet_gradient_checkpointing=True))
    assert {"vae-grad-checkpointing", "unet-grad-checkpointing"} <= set(applied)
    g1, (l1, w1) = encode_grad(), lora_after_update()
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-5)
    assert abs(l0 - l1) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6 * max(1.0, float(a.abs().max())), rtol=1e-4) for a, b in zip(w0, w1))


def test_offloaded_text_encoder_gives_the_same_embeddings(tiny_prior):
    inner = tiny_prior.conditioner
    expected = inner.encode(["a red chair, front view"], negative=False)
    wrapped = OffloadedTextConditioner(inner, offload="cpu")
    got = wrapped.encode(["a red chair, front view"], negative=False)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert next(wrapped.text_encoder.parameters()).device == torch.device("cpu")
    assert wrapped.tokenizer is inner.tokenizer  # everything else passes through


def test_device_defaults():
    assert choose_dtype("cpu") == torch.float32
    cpu = for_device("cpu")
    assert cpu.sdpa and not cpu.channels_last and not cpu.compile_unet
    cuda = for_device("cuda")
    assert cuda.channels_last and cuda.offload_text_encoder and not cuda.tf32


def test_cpu_fast_path_changes_nothing_numerically(tiny_prior):
    before = _denoise(tiny_prior)
    applied = apply_fast_path(tiny_prior, for_device("cpu"), "cpu")
    assert applied == ["sdpa-unet", "sdpa-vae"]  # no offload on CPU: there is nothing to free
    assert torch.equal(before, _denoise(tiny_prior))


def test_tf32_is_set_both_ways_for_matmuls_and_convolutions():
    """cuDNN allows TF32 by default; the fast path's "off" must switch it off too (flags only: no
    CUDA work happens for an object without networks)."""
    from types import SimpleNamespace

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert apply_fast_path(SimpleNamespace(), FastPath(tf32=False), "cuda") == []
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert apply_fast_path(SimpleNamespace(), FastPath(tf32=True), "cuda") == ["tf32"]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
