"""One entry point from a model name to a diffusion prior: the class comes from model_index.json."""

from __future__ import annotations

from typing import Any

import torch

from .hub import DEFAULT_REVISION, SD_PIPELINES, locate, variant_for_dtype
from .latent_diffusion import LatentDiffusionPrior, pick_dtype


def load_diffusion_prior(model: str, role: str, device: torch.device | str = "cpu", dtype: str = "auto",
                         local_files_only: bool = False, revision: str = DEFAULT_REVISION,
                         **kwargs: Any) -> LatentDiffusionPrior:
    """A Stable Diffusion or SDXL-refiner prior for a role (``prior``, ``phi``, ``refiner``).

    The folder's pipeline class decides: a Stable Diffusion 1.x/2.x pipeline becomes a
    StableDiffusionPrior in any role (so a small model can refine itself in stage 3), the SDXL
    refiner a SdxlRefinerPrior; an SDXL base model in the refiner's role is refused by name.
    """
    from .sdxl_refiner import SdxlRefinerPrior
    from .stable_diffusion import StableDiffusionPrior

    device = torch.device(device)
    torch_dtype = pick_dtype(dtype, device)
    files = locate(model, role, variant_for_dtype(str(torch_dtype).removeprefix("torch.")), local_files_only,
                   revision)
    cls = StableDiffusionPrior if files.pipeline_class in SD_PIPELINES else SdxlRefinerPrior
    if cls is StableDiffusionPrior:
        kwargs.pop("size", None)
    return cls.from_files(files, device, torch_dtype, **kwargs)
