"""Stable Diffusion / SDXL-refiner priors on tiny random pipelines: loading, conversions, CFG, LoRA, VAE."""

import shutil

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline

from dreamflow.priors.latent_diffusion import PriorLoadError
from dreamflow.priors.score_models import LoraScoreModel
from dreamflow.priors.sdxl_refiner import SdxlRefinerPrior
from dreamflow.priors.stable_diffusion import StableDiffusionPrior
from dreamflow.priors.tiny import clip_tokenizer
from dreamflow.scene.cameras import Cameras


def test_offline_clip_tokenizer_matches_known_ids():
    # Ids of the real CLIP ViT-L/14 tokenizer for this sentence.
    ids = clip_tokenizer()("a photo of a cat, front view").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 267, 2184, 1093, 49407]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_conversions_agree_with_diffusers_schedulers(prediction_type, tiny_sd_eps, tiny_sd_v):
    folder = tiny_sd_eps if prediction_type == "epsilon" else tiny_sd_v
    prior = StableDiffusionPrior.from_pretrained(str(folder), local_files_only=True)
    assert prior.prediction_type == prediction_type
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    euler = EulerDiscreteScheduler(**cfg)
    euler.set_timesteps(1000)
    ddpm = DDPMScheduler(**cfg, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x0, n, out = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for step in (999, 700, 300, 20):
        sigma = prior.sigma(step / 1000)
        assert float(sigma) == pytest.approx(float(euler.sigmas[999 - step]), rel=1e-5)
        assert float(prior.denoiser.timestep(sigma.reshape(1))) == pytest.approx(step, abs=1e-3)
        x_noisy = x0 + sigma * n
        t = torch.tensor(step)
        x_t = prior.denoiser.model_input(x_noisy, sigma)
        assert torch.allclose(x_t, ddpm.add_noise(x0, n, t), atol=1e-5)
        euler._step_index = None  # the scheduler is stateful; look the step up from the timestep
        assert torch.allclose(x_t, euler.scale_model_input(x_noisy, euler.timesteps[999 - step]), atol=1e-6)
        euler._step_index = None
        ours = prior.denoiser.to_x0(out, x_noisy, sigma)
        assert torch.allclose(ours, euler.step(out, euler.timesteps[999 - step], x_noisy).pred_original_sample, atol=1e-4)
        assert torch.allclose(ours, ddpm.step(out, step, x_t).pred_original_sample, atol=1e-4)
        target = prior.denoiser.target(x0, n, sigma.reshape(1))
        expected = n if prediction_type == "epsilon" else ddpm.get_velocity(x0, n, t.expand(2))
        assert torch.allclose(target, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_denoise_matches_the_pipeline(prediction_type, tiny_sd_eps, tiny_sd_v):
    folder = str(tiny_sd_eps if prediction_type == "epsilon" else tiny_sd_v)
    prior = StableDiffusionPrior.from_pretrained(folder, local_files_only=True, view_dependent=False)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler.set_timesteps(1000)
    cond = prior.condition("a red chair", "blurry", guidance=5.0)
    pos, neg = pipe.encode_prompt("a red chair", "cpu", 1, True, "blurry")
    x_noisy = 3.0 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    step = 600
    t = euler.timesteps[999 - step]
    with torch.no_grad():
        x_in = euler.scale_model_input(torch.cat([x_noisy, x_noisy]), t)
        raw = pipe.unet(x_in, t, encoder_hidden_states=torch.cat([pos.expand(2, -1, -1), neg.expand(2, -1, -1)])).sample
    eps_c, eps_u = raw.chunk(2)
    euler._step_index = None
    expected = euler.step(eps_u + 5.0 * (eps_c - eps_u), t, x_noisy).pred_original_sample
    got = prior.denoise(x_noisy, prior.sigma(step / 1000), cond)
    assert torch.allclose(got, expected, atol=1e-4)


def test_view_suffix_embeddings_are_picked_per_camera(tiny_sd_eps):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True)
    cond = prior.condition("a red chair")
    front_back = Cameras.make([0.0, 180.0], 10.0, 1.2, 50.0)
    assert prior.prompt_index(2, front_back).tolist() == [1, 3]
    assert prior.prompt_index(2, None).tolist() == [0, 0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).expand(2, -1, -1, -1)
    d = prior.denoise(x, torch.tensor(1.0), cond, front_back)
    assert not torch.allclose(d[0], d[1])
    same = prior.denoise(x, torch.tensor(1.0), cond, Cameras.make([10.0, -20.0], 10.0, 1.2, 50.0))
    assert torch.allclose(same[0], same[1], atol=1e-6)


def test_refiner_conditioning_matches_the_pipeline(tiny_refiner):
    prior = SdxlRefinerPrior.from_pretrained(str(tiny_refiner), local_files_only=True, view_dependent=False)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner), local_files_only=True)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt("a red chair", device="cpu", do_classifier_free_guidance=True,
                                                      negative_prompt="")
    cond = prior.condition("a red chair", "", guidance=3.0)
    assert torch.allclose(cond.data["cond"]["encoder_hidden_states"], pos, atol=1e-6)
    assert torch.allclose(cond.data["cond"]["text_embeds"], pooled, atol=1e-6)
    assert torch.allclose(cond.data["uncond"]["encoder_hidden_states"], neg, atol=1e-6)
    ids, neg_ids = pipe._get_add_time_ids((1024, 1024), (0, 0), (1024, 1024), 6.0, 2.5, (1024, 1024), (0, 0),
                                          (1024, 1024), dtype=torch.float32, text_encoder_projection_dim=32)
    assert cond.data["cond"]["time_ids"][0].tolist() == ids[0].tolist()
    assert cond.data["uncond"]["time_ids"][0].tolist() == neg_ids[0].tolist()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = prior.sigma(0.25)
    with torch.no_grad():
        raw = pipe.unet(torch.cat([x, x]) / (1 + sigma ** 2).sqrt(), prior.denoiser.timestep(sigma.reshape(1)),
                        encoder_hidden_states=torch.cat([pos, neg]),
                        added_cond_kwargs={"text_embeds": torch.cat([pooled, neg_pooled]), "time_ids": torch.cat([ids, neg_ids])}).sample
    d = x - sigma * raw
    assert torch.allclose(prior.denoise(x, sigma, cond), d[1:] + 3.0 * (d[:1] - d[1:]), atol=1e-4)


def test_lora_off_is_the_pretrained_model_bit_for_bit(tiny_sd_v):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_v), local_files_only=True)
    cond = prior.condition("a red chair")
    cams = Cameras.make([0.0, 100.0], [10.0, 30.0], 1.2, 50.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([2.0, 0.5])
    before = prior.denoise(x, sigma, cond, cams)
    phi = LoraScoreModel(prior, rank=4, lr=1e-2, camera_embedding=True)
    assert torch.equal(phi.denoise(x, sigma, cond, cams), prior.denoise(x, sigma, cond, cams, guidance=1.0))
    losses = [phi.update(x, sigma, cond, cams) for _ in range(3)]
    assert all(loss > 0 for loss in losses)
    assert not torch.allclose(phi.denoise(x, sigma, cond, cams), prior.denoise(x, sigma, cond, cams, guidance=1.0))
    assert torch.equal(prior.denoise(x, sigma, cond, cams), before)
    assert float(phi.camera.net[2].weight.detach().abs().sum()) > 0  # the camera MLP learns too
    state = phi.state_dict()
    trained = phi.denoise(x, sigma, cond, cams)
    phi.update(x, sigma, cond, cams)
    phi.load_state_dict(state)
    assert torch.equal(phi.denoise(x, sigma, cond, cams), trained)
    phi.close()
    assert not getattr(prior.unet, "peft_config", None) and not prior.unet.time_embedding._forward_hooks
    assert torch.equal(prior.denoise(x, sigma, cond, cams), before)


def test_lora_on_a_separate_phi_base(tiny_sd_eps, tiny_sd_v):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True)
    phi_base = StableDiffusionPrior.from_pretrained(str(tiny_sd_v), local_files_only=True, load_vae=False)
    phi = LoraScoreModel(prior, phi_base=phi_base)
    cond = prior.condition("a red chair")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(phi.denoise(x, torch.tensor(1.0), cond), phi_base.denoise(x, torch.tensor(1.0), phi_base.condition("a red chair"), guidance=1.0))
    assert phi.update(x, torch.tensor(1.0), cond) > 0
    assert not getattr(prior.unet, "peft_config", None)  # the prior's UNet is untouched


def test_vae_gradient_reaches_the_render(tiny_sd_eps):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True)
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    latents = prior.encode(image)
    assert latents.shape == (1, 4, 4, 4)
    (latents ** 2).sum().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert prior.decode(latents.detach()).shape == (1, 3, 32, 32)


def test_missing_files_give_a_clear_error(tiny_sd_eps, tmp_path):
    with pytest.raises(PriorLoadError, match="no/such-model.*local files only.*To fix"):
        StableDiffusionPrior.from_pretrained("no/such-model", local_files_only=True)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_eps, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(PriorLoadError, match="unet"):
        StableDiffusionPrior.from_pretrained(str(broken), local_files_only=True)


def test_two_stage_adapters_on_one_unet_stay_separate(tiny_sd_eps):
    prior = StableDiffusionPrior.from_pretrained(str(tiny_sd_eps), local_files_only=True, view_dependent=False)
    cond = prior.condition("a red chair")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor(0.8)
    base = prior.denoise(x, sigma, cond, guidance=1.0)
    first = LoraScoreModel(prior, lr=1e-2, adapter_name="phi_stage1")
    first.update(x, sigma, cond)
    first_out = first.denoise(x, sigma, cond)
    second = LoraScoreModel(prior, lr=1e-2, adapter_name="phi_texture")
    assert torch.equal(second.denoise(x, sigma, cond), base)  # a new adapter starts as the base model
    second.update(x, sigma, cond)
    assert torch.equal(first.denoise(x, sigma, cond), first_out)  # training one leaves the other alone
    assert torch.equal(prior.denoise(x, sigma, cond, guidance=1.0), base)
