"""Image-text scorers for R-precision: the toy evaluator over toy-world prompts, or a real CLIP model.

A scorer turns a batch of images (B, 3, H, W) in [0, 1] and a list of P prompts into a (B, P)
matrix of scores; retrieval takes the best prompt per image. The toy scorer's score of "a red
cube" is ``log p(shape = cube) + log p(colour = red)`` under the toy evaluator's two heads; CLIP's
is its image-text logit (scaled cosine similarity), as in the papers' CLIP R-precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

#: OpenAI CLIP's image normalisation (every released CLIP uses it; a local folder's
#: preprocessor_config.json overrides it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerLoadError(RuntimeError):
    """A scorer's model could not be loaded; the message names it and says how to fix it."""


class Scorer(Protocol):
    """Scores images against prompts; ``resolution`` is the render size it wants."""

    name: str
    resolution: int

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ValueError when a prompt cannot be scored (the toy scorer knows only its world)."""

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, P) scores of images (B, 3, H, W) in [0, 1] against the prompts; higher is better."""


class ToyScorer:
    """The toy evaluator as a retrieval scorer over toy-world prompts."""

    def __init__(self, evaluator, name: str = "toy-evaluator"):
        self.evaluator = evaluator
        self.name = name
        self.resolution = int(evaluator.config.render_resolution)

    def _labels(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .evaluator import label_indices
        from .world import parse_prompt

        return label_indices([parse_prompt(p) for p in prompts])

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Every prompt must name one shape and one colour of the toy world (parse_prompt's error otherwise)."""
        self._labels(prompts)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``log p(shape) + log p(colour)`` of each prompt's shape and colour."""
        shape_idx, colour_idx = self._labels(prompts)
        shape_logp, colour_logp = self.evaluator.log_probs(images)
        return shape_logp[:, shape_idx] + colour_logp[:, colour_idx]


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class ClipScorer:
    """A real CLIP model (transformers' CLIPModel) by Hugging Face id or local folder."""

    def __init__(self, model: str, device: torch.device | str = "cpu", local_files_only: bool | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        self.name = model
        self.device = torch.device(device)
        local = Path(model).is_dir()
        if not local and (Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
            raise ScorerLoadError(f"could not load CLIP model {model!r}: no such folder. To fix: pass an existing folder "
                                  f"written by CLIPModel.save_pretrained, or a Hugging Face id such as openai/clip-vit-large-patch14")
        if local_files_only is None:
            local_files_only = local or _offline()
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=local_files_only).to(self.device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            where = "the local folder" if local else ("the Hugging Face cache (offline)" if local_files_only else "Hugging Face")
            fix = (f"pass a local folder written by CLIPModel.save_pretrained (with its tokenizer), or download it once "
                   f"with `hf download {model}` on a machine with internet and copy the cache")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ScorerLoadError(f"could not load CLIP model {model!r} from {where}: {first.rstrip('.')}. To fix: {fix}") from exc
        self.resolution = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(model) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Any text is fine for CLIP."""

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's image-text logits: ``logit_scale * cos(image embedding, text embedding)``."""
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            # Square renders: CLIP's shortest-edge resize plus centre crop is a plain resize.
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model(pixel_values=x, **tokens).logits_per_image


def load_scorer(clip: str | None = None, evaluator: str | Path | None = None,
                device: torch.device | str = "cpu") -> Scorer:
    """A real CLIP scorer when ``clip`` names a model, else the toy evaluator (the shipped one by default)."""
    if clip:
        return ClipScorer(clip, device)
    from .evaluator import load_evaluator

    model = load_evaluator(evaluator)
    return ToyScorer(model, name="toy-evaluator" if evaluator is None else str(evaluator))
