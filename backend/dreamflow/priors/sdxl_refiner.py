"""The SDXL refiner as a prior (DreamFlow stage 3): second text encoder only, pooled text
embeddings and time ids with the aesthetic score, at 1024x1024 original size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hub import ROLE_LABELS, ModelFiles, PriorLoadError
from .latent_diffusion import LatentDiffusionPrior, TextConditioner, load_part


class SdxlRefinerConditioner(TextConditioner):
    """Penultimate hidden states and pooled projection of text_encoder_2, plus SDXL time ids.

    Time ids follow the refiner (``requires_aesthetics_score``): original size, crop corner and
    the aesthetic score (6.0, the unconditional side 2.5); without that flag: original size, crop
    corner and target size. ``force_zeros_for_empty_prompt`` gives an empty negative prompt zero
    embeddings, as the pipeline does.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, device: torch.device,
                 requires_aesthetics_score: bool = True, force_zeros_for_empty_prompt: bool = False,
                 size: int = 1024, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.device = device
        self.requires_aesthetics_score = requires_aesthetics_score
        self.force_zeros = force_zeros_for_empty_prompt
        self.size = size
        self.aesthetic_score = aesthetic_score
        self.negative_aesthetic_score = negative_aesthetic_score

    @classmethod
    def load(cls, files: ModelFiles, device: torch.device, dtype: torch.dtype,
             size: int = 1024) -> "SdxlRefinerConditioner":
        """tokenizer_2 and text_encoder_2 of a located SDXL refiner pipeline."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tok = load_part(CLIPTokenizer, files, "tokenizer_2")
        enc = load_part(CLIPTextModelWithProjection, files, "text_encoder_2", dtype=dtype)
        return cls(tok, enc, device, bool(files.index.get("requires_aesthetics_score", True)),
                   bool(files.index.get("force_zeros_for_empty_prompt", False)), size)

    def check(self, unet: torch.nn.Module, files: ModelFiles) -> None:
        """The UNet takes text_encoder_2's width, its pooled embedding and this many time ids."""
        label = ROLE_LABELS.get(files.role, files.role)
        cfg = unet.config
        width = int(self.text_encoder.config.hidden_size)
        pooled = int(self.text_encoder.config.projection_dim)
        if getattr(cfg, "addition_embed_type", None) != "text_time":
            raise PriorLoadError(f"unet of model {files.model!r} ({label}) takes no SDXL text/time embeddings. "
                                 f"To fix: use the SDXL refiner's own unet.")
        expected = len(self.time_ids(False)) * int(cfg.addition_time_embed_dim) + pooled
        if int(cfg.cross_attention_dim) != width or int(cfg.projection_class_embeddings_input_dim) != expected:
            raise PriorLoadError(
                f"unet of model {files.model!r} ({label}) expects text width {cfg.cross_attention_dim} and "
                f"{cfg.projection_class_embeddings_input_dim} added-embedding inputs, but text_encoder_2 and "
                f"{len(self.time_ids(False))} time ids give {width} and {expected} (an SDXL base unet?). "
                f"To fix: use the refiner's unet, stabilityai/stable-diffusion-xl-refiner-1.0.")

    def time_ids(self, negative: bool) -> torch.Tensor:
        """(5,) or (6,) SDXL micro-conditioning for a square image of ``size``."""
        s = float(self.size)
        if self.requires_aesthetics_score:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            return torch.tensor([s, s, 0.0, 0.0, score])
        return torch.tensor([s, s, 0.0, 0.0, s, s])

    def encode(self, prompts: Sequence[str], negative: bool) -> dict[str, torch.Tensor]:
        """Penultimate hidden states, pooled text embeddings and time ids."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids, output_hidden_states=True)
        hidden, pooled = out.hidden_states[-2], out.text_embeds
        if negative and self.force_zeros and all(p == "" for p in prompts):
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        time_ids = self.time_ids(negative).to(self.device, hidden.dtype).expand(len(prompts), -1)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": time_ids}


class SdxlRefinerPrior(LatentDiffusionPrior):
    """stabilityai/stable-diffusion-xl-refiner-1.0 (and pipelines laid out like it)."""

    conditioner_class = SdxlRefinerConditioner
    pipeline_classes = ("StableDiffusionXLImg2ImgPipeline",)
    default_role = "refiner"
