"""Tiny random Stable Diffusion and SDXL-refiner pipelines, saved to disk, for weight-free tests.

They are built in-process from small diffusers/transformers configs (random weights), written
with ``save_pretrained`` and loaded back through the real loading path of the priors, so tests
exercise loading, LoRA, guidance, the VAE and the EDM <-> DDPM conversions. The tokenizer is the
real CLIP BPE tokenizer, made offline from the vocabulary file that ships inside the
open-clip-torch wheel (only that data file is read; open_clip itself is never imported, since it
needs torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util

from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

#: CLIP keeps the first 49152 - 256 - 2 merges of its BPE file (256 bytes, 2 special tokens).
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_bpe_file() -> Path:
    """Path of CLIP's BPE vocabulary inside the installed open-clip-torch package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary comes from open-clip-torch; install it with "
                                "`.venv/bin/pip install --no-deps open-clip-torch`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / CLIP_VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"open-clip-torch is installed but has no {CLIP_VOCAB_FILE}")


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE vocabulary (49408 tokens) and merges, as CLIPTokenizer wants them."""
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + CLIP_MERGES]  # line 0 is a version header
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    """A real CLIP tokenizer built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=77)


def _text_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, projection_dim=32 if projection else 512,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks: the latent is 1/8 of the image, as in the real VAE.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64)


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1)


def _unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, **extra)


def tiny_stable_diffusion(folder: str | Path, prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
                          seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline to ``folder`` (reused if already there); its path."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(False)),
                                   tokenizer=clip_tokenizer(), unet=_unet(32), scheduler=_scheduler(prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl_refiner(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionXLImg2ImgPipeline laid out like the SDXL refiner; its path."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    # Refiner time ids: original size (2), crop corner (2), aesthetic score (1) -> 5 x 8 + pooled 32.
    unet = _unet(32, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=5 * 8 + 32)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=_vae(), text_encoder=None,
                                            text_encoder_2=CLIPTextModelWithProjection(_text_config(True)),
                                            tokenizer=None, tokenizer_2=clip_tokenizer(), unet=unet,
                                            scheduler=_scheduler("epsilon"), requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_model_folder(cache: str | Path, role: Literal["prior", "refiner"] = "prior",
                      prediction_type: Literal["epsilon", "v_prediction"] = "epsilon", seed: int = 0) -> Path:
    """The tiny random model of ``role`` kept under ``cache``, written on first use and reused after:
    the one place its folder is named (a job's cache and the benchmark's work folder alike)."""
    cache = Path(cache)
    if role == "refiner":
        return tiny_sdxl_refiner(cache / "tiny-sdxl-refiner", seed=seed)
    return tiny_stable_diffusion(cache / f"tiny-sd-{prediction_type}", prediction_type=prediction_type, seed=seed)

