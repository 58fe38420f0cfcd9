"""Stable Diffusion 1.x/2.x as a prior: CLIP text encoder, penultimate-free last hidden state.

Defaults follow DreamFlow: SD 2.1-base (epsilon) as ``p``; SD 2.1 (v-prediction) as the base of
the LoRA score model ``phi`` (see score_models.LoraScoreModel for the one- or two-UNet layout).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hub import ROLE_LABELS, SD_PIPELINES, ModelFiles, PriorLoadError
from .latent_diffusion import LatentDiffusionPrior, TextConditioner, load_part


class ClipTextConditioner(TextConditioner):
    """SD 1.x/2.x: the text encoder's last hidden state is the cross-attention input."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, device: torch.device):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.device = device

    @classmethod
    def load(cls, files: ModelFiles, device: torch.device, dtype: torch.dtype) -> "ClipTextConditioner":
        """Tokenizer and text encoder of a located StableDiffusionPipeline."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = load_part(CLIPTokenizer, files, "tokenizer")
        enc = load_part(CLIPTextModel, files, "text_encoder", dtype=dtype)
        return cls(tok, enc, device)

    def check(self, unet: torch.nn.Module, files: ModelFiles) -> None:
        """The UNet cross-attends to this text encoder's width and wants no SDXL extras."""
        width = int(self.text_encoder.config.hidden_size)
        label = ROLE_LABELS.get(files.role, files.role)
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise PriorLoadError(f"unet of model {files.model!r} ({label}) expects SDXL's added text and time "
                                 f"embeddings, but the model is laid out as Stable Diffusion 1.x/2.x. To fix: "
                                 f"use a matching unet, or an SDXL refiner folder for stage 3.")
        if int(unet.config.cross_attention_dim) != width:
            raise PriorLoadError(f"unet of model {files.model!r} ({label}) cross-attends to width "
                                 f"{unet.config.cross_attention_dim}, but its text_encoder gives {width}. To fix: "
                                 f"use the unet and text_encoder of one model.")

    def encode(self, prompts: Sequence[str], negative: bool) -> dict[str, torch.Tensor]:
        """Last hidden states (B, 77, D)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}


class StableDiffusionPrior(LatentDiffusionPrior):
    """Stable Diffusion 1.x/2.x (epsilon or v-prediction) through diffusers."""

    conditioner_class = ClipTextConditioner
    pipeline_classes = SD_PIPELINES
