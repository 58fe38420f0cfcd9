"""Stable Diffusion 1.x/2.x as a prior: CLIP text encoder, penultimate-free last hidden state.

Defaults follow DreamFlow: SD 2.1-base (epsilon) as ``p``; SD 2.1 (v-prediction) as the base of
the LoRA score model ``phi`` (see score_models.LoraScoreModel for the one- or two-UNet layout).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .latent_diffusion import LatentDiffusionPrior, TextConditioner, load_part


class ClipTextConditioner(TextConditioner):
    """SD 1.x/2.x: the text encoder's last hidden state is the cross-attention input."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, device: torch.device):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.device = device

    @classmethod
    def load(cls, model: str, index: dict, device: torch.device, dtype: torch.dtype,
             local_files_only: bool) -> "ClipTextConditioner":
        """Tokenizer and text encoder of a StableDiffusionPipeline folder or id."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = load_part(CLIPTokenizer, model, "tokenizer", local_files_only)
        enc = load_part(CLIPTextModel, model, "text_encoder", local_files_only, dtype=dtype)
        return cls(tok, enc, device)

    def encode(self, prompts: Sequence[str], negative: bool) -> dict[str, torch.Tensor]:
        """Last hidden states (B, 77, D)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}


class StableDiffusionPrior(LatentDiffusionPrior):
    """Stable Diffusion 1.x/2.x (epsilon or v-prediction) through diffusers."""

    conditioner_class = ClipTextConditioner
