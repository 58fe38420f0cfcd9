"""The shipped toy-world generator: a diffusers Stable Diffusion folder, small enough to ship, loaded
by the very function that loads Stable Diffusion; and prompts it cannot know are refused up front."""

import json

import pytest
import torch

from dreamflow.cli import main
from dreamflow.config import ConfigError
from dreamflow.pipeline.config import build_config
from dreamflow.priors import loading
from dreamflow.priors.stable_diffusion import StableDiffusionPrior
from dreamflow.priors.tiny import tiny_stable_diffusion
from dreamflow.toyworld import GENERATOR_FOLDER
from dreamflow.toyworld.world import MARKER_FILE


def test_the_shipped_folder_is_a_small_stable_diffusion_pipeline():
    index = json.loads((GENERATOR_FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    sched = json.loads((GENERATOR_FOLDER / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]) == \
        ("scaled_linear", 0.00085, 0.012, 1000)
    assert sched["prediction_type"] in ("epsilon", "v_prediction")
    assert (GENERATOR_FOLDER / MARKER_FILE).is_file()
    size = sum(p.stat().st_size for p in GENERATOR_FOLDER.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024


def test_it_loads_through_the_same_function_as_a_stable_diffusion_folder(tmp_path, monkeypatch):
    seen = []
    original = StableDiffusionPrior.from_files.__func__

    def spy(cls, files, *args, **kwargs):
        seen.append(files.pipeline_class)
        return original(cls, files, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPrior, "from_files", classmethod(spy))
    sd = loading.load_diffusion_prior(str(tiny_stable_diffusion(tmp_path / "sd")), "prior", dtype="float32",
                                      local_files_only=True)
    toy = loading.load_diffusion_prior(str(GENERATOR_FOLDER), "prior", dtype="float32", local_files_only=True,
                                       encode_size=64)
    assert seen == ["StableDiffusionPipeline", "StableDiffusionPipeline"]
    assert type(sd) is type(toy) is StableDiffusionPrior
    # The latent path of SD: 64 px renders -> VAE latents, differentiably; guided denoising of them.
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = toy.encode(images)
    assert latents.shape == (2, 4, 16, 16)
    latents.square().mean().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    cond = toy.condition("a red cube", guidance=4.0)
    d = toy.denoise(latents.detach() + toy.sigma(torch.tensor(0.5)) * torch.randn_like(latents), toy.sigma(torch.tensor(0.5)), cond)
    assert d.shape == latents.shape and torch.isfinite(d).all()


def test_an_unknown_prompt_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="toy world does not know"):
        build_config("toy", prompt="a wooden chair")
    out = tmp_path / "never"
    assert main(["generate", "a pink dog", "--preset", "toy", "--out", str(out)]) == 2
    assert main(["demo", "--prompt", "a green teapot", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pink" in err and "teapot" in err and "square pyramid" in err
    assert not out.exists()
    # Any other prior keeps accepting any prompt.
    assert build_config("paper", prompt="a wooden chair").prompt == "a wooden chair"
