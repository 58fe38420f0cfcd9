"""2D samples of a toy-world model, drawn the standard diffusers way (DDIM, classifier-free guidance).

This is how the 2D model is judged on its own (the issue's >= 90 % bar), independent of the 3D
pipeline's own use of the same folder.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_pipeline(model: str):
    """The folder as a diffusers StableDiffusionPipeline with a DDIM scheduler, float32 on the CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(model: str, prompts: list[str], per_prompt: int, steps: int = 30, guidance: float = 4.0,
                  seed: int = 0, batch: int = 36) -> torch.Tensor:
    """``per_prompt`` samples of each prompt, prompt-major: (len(prompts) * per_prompt, 3, H, W) in [0, 1]."""
    pipe = load_pipeline(model)
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    flat = [p for p in prompts for _ in range(per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(flat), batch):
        chunk = flat[i:i + batch]
        res = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gen, output_type="pt")
        out.append(res.images.float().clamp(0.0, 1.0))
    return torch.cat(out)


def save_grid(images: torch.Tensor, rows: int, path: Path) -> Path:
    """Images (N, 3, H, W) in [0, 1] as one PNG with ``rows`` rows."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    grid = images[:rows * cols].view(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy()).save(path)
    return path
