"""The SDXL refiner as a prior (DreamFlow stage 3): second text encoder only, pooled text
embeddings and time ids with the aesthetic score, at 1024x1024 original size.
"""

from __future__ import annotations

from typing import Sequence

import torch

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
    def load(cls, model: str, index: dict, device: torch.device, dtype: torch.dtype, local_files_only: bool,
             size: int = 1024) -> "SdxlRefinerConditioner":
        """tokenizer_2 and text_encoder_2 of an SDXL (refiner) pipeline folder or id."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tok = load_part(CLIPTokenizer, model, "tokenizer_2", local_files_only)
        enc = load_part(CLIPTextModelWithProjection, model, "text_encoder_2", local_files_only, dtype=dtype)
        return cls(tok, enc, device, bool(index.get("requires_aesthetics_score", True)),
                   bool(index.get("force_zeros_for_empty_prompt", False)), size)

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
