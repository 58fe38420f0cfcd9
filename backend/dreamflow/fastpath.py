"""The CUDA fast path, chosen in this one place: precision, attention kernel, memory layout,
compilation and what may leave GPU memory once a job's prompts are embedded.

Every switch keeps the numbers of the plain path within a stated tolerance (tests compare them on
CPU); what each one is expected to buy on a GPU, and what was measured, is logged in
``bench/NOTES.md``. Nothing here changes the method: the same passes run, faster or smaller.

What the priors already do (checked, see NOTES.md): conditional and unconditional halves go through
the UNet in one batched pass; prompts are embedded once per job (``Prior.condition``); with the
LoRA on the prior's own UNet there is one UNet in memory and the adapter is switched on only for
D_phi's passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class FastPath:
    """Switches of the fast path; ``for_device`` gives the defaults for a device."""

    dtype: DtypeName = "auto"          # auto: bfloat16 on sm80+, float16 on older CUDA, float32 on CPU
    sdpa: bool = True                  # torch SDPA in every attention layer; False: unfused (baseline)
    channels_last: bool = False        # NHWC convolutions (tensor cores on CUDA)
    tf32: bool = False                 # TF32 matmuls/convolutions for what stays in float32 (CUDA)
    compile_unet: bool = False         # torch.compile the UNet (both LoRA states compile once each)
    compile_mode: str = "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"  # "eager" traces with dynamo only (checks guards, no codegen)
    offload_text_encoder: bool = True  # text encoder off the accelerator except while embedding
    vae_gradient_checkpointing: bool = False   # recompute VAE-encoder activations in backward
    unet_gradient_checkpointing: bool = False  # recompute UNet activations in the LoRA update's backward


def for_device(device: torch.device | str) -> FastPath:
    """The default switches for a device: all of them on CUDA, the value-neutral ones on CPU."""
    if torch.device(device).type == "cuda":
        # TF32 stays off: the diffusion passes run in bf16 and do not use it, while the float32
        # geometry does (camera rays, clip transforms: emulated TF32 rounding moves 512 px rays by
        # up to 0.4 px); what it would speed up is the small hash-grid MLPs. bench/switches.py
        # has the rung to measure it.
        return FastPath(channels_last=True, tf32=False, compile_unet=False)
    return FastPath()


def choose_dtype(device: torch.device | str, name: DtypeName = "auto") -> torch.dtype:
    """Weights' dtype: bfloat16 where the GPU has it (no overflow, no loss scaling), else float16
    on CUDA/MPS, float32 on CPU. On a CPU bf16 pays only for the real model on a CPU with bf16
    instructions (bench/switches.py: 2.1x for SD 2.1's passes on an AVX512-BF16 EPYC, 0.55x for
    the tiny test model), and CPU runs are the tiny tests and the weight-free demo: pass
    ``bfloat16`` explicitly where it pays."""
    from .priors.latent_diffusion import pick_dtype

    return pick_dtype(name, torch.device(device))


class OffloadedTextConditioner:
    """A prior's text conditioner whose text encoder waits on ``offload`` between uses.

    Prompts are embedded once per job; in between the encoder (0.7 GB for SD 2.1, 1.4 GB for the
    SDXL refiner in half precision) would only hold accelerator memory. It is moved to the prior's
    device for :meth:`encode` and back right after, so a cached prior still embeds the next job's
    prompt. The embeddings are the ones the wrapped conditioner computes, unchanged.
    """

    def __init__(self, inner: Any, offload: torch.device | str = "cpu"):
        self.inner = inner
        self.offload = torch.device(offload)
        self.inner.text_encoder.to(self.offload)

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The wrapped text encoder (on ``offload`` between uses)."""
        return self.inner.text_encoder

    @property
    def device(self) -> torch.device:
        """Where embeddings are computed and returned."""
        return self.inner.device

    def encode(self, prompts: Sequence[str], negative: bool) -> dict[str, torch.Tensor]:
        """The wrapped conditioner's embeddings, with the encoder on the device only meanwhile."""
        encoder = self.inner.text_encoder
        encoder.to(self.inner.device)
        try:
            return self.inner.encode(prompts, negative)
        finally:
            encoder.to(self.offload)
            if self.inner.device.type == "cuda":
                torch.cuda.empty_cache()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.inner, name)


def set_sdpa(module: torch.nn.Module, fused: bool = True) -> bool:
    """Use PyTorch's SDPA processor (AttnProcessor2_0) in every attention layer, or with
    ``fused=False`` diffusers' unfused AttnProcessor (softmax(QK^T)V in three kernels: the baseline
    of the measurement); True if the module has attention layers."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(module, "set_attn_processor") or not getattr(module, "attn_processors", None):
        return False
    module.set_attn_processor(AttnProcessor2_0() if fused else AttnProcessor())
    return True


def uses_sdpa(module: torch.nn.Module) -> bool:
    """True when every attention layer of a diffusers model runs the SDPA processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = getattr(module, "attn_processors", {}) or {}
    return bool(procs) and all(isinstance(p, AttnProcessor2_0) for p in procs.values())


def apply_fast_path(prior: Any, fast: FastPath, device: torch.device | str | None = None) -> list[str]:
    """Apply the switches to a latent diffusion prior (its UNet, VAE, text conditioner) in place;
    the names of what was applied, for logs and the benchmark table."""
    device = torch.device(device) if device is not None else getattr(prior, "device", torch.device("cpu"))
    done: list[str] = []
    if device.type == "cuda":
        # Both flags, both ways: cuDNN's defaults to on, so "off" has to be said (float32
        # convolutions, e.g. an upcast VAE, would otherwise still round to TF32).
        torch.backends.cuda.matmul.allow_tf32 = fast.tf32
        torch.backends.cudnn.allow_tf32 = fast.tf32
        if fast.tf32:
            done.append("tf32")
    unet = getattr(prior, "unet", None)
    vae = getattr(prior, "vae", None)
    kind = "sdpa" if fast.sdpa else "unfused-attention"
    if unet is not None and set_sdpa(unet, fast.sdpa):
        done.append(f"{kind}-unet")
    if vae is not None and set_sdpa(vae, fast.sdpa):
        done.append(f"{kind}-vae")
    if fast.channels_last:
        for name, module in (("unet", unet), ("vae", vae)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
                done.append(f"channels-last-{name}")
    if fast.vae_gradient_checkpointing and vae is not None:
        vae.enable_gradient_checkpointing()
        done.append("vae-grad-checkpointing")
    if fast.unet_gradient_checkpointing and unet is not None:
        unet.enable_gradient_checkpointing()
        done.append("unet-grad-checkpointing")
    if fast.offload_text_encoder and device.type != "cpu":
        conditioner = getattr(prior, "conditioner", None)
        if conditioner is not None and hasattr(conditioner, "text_encoder") \
                and not isinstance(conditioner, OffloadedTextConditioner):
            prior.conditioner = OffloadedTextConditioner(conditioner)
            done.append("text-encoder-offload")
    if fast.compile_unet and unet is not None:
        # In place (nn.Module.compile): the prior, its denoiser and the LoRA model keep the same
        # object, and peft can still switch the adapter (a guard; each state compiles once).
        if fast.compile_backend == "inductor":
            unet.compile(mode=fast.compile_mode, dynamic=False)
        else:
            unet.compile(backend=fast.compile_backend, dynamic=False)
        done.append(f"compile-unet({fast.compile_backend}, {fast.compile_mode})")
    return done
