"""Loading the paper's models by their Hugging Face ids from a cache with the real layout, offline.

The cache (conftest.offline_hub) holds tiny random models under the real ids, with the real
model_index.json and scheduler configs, fp16 variants, and .ckpt/.bin duplicates full of garbage
that a loader must never read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from offline_hub import SD21, SD21_BASE, SDXL_REFINER, cache_listing
from safetensors.torch import load_file

from dreamflow.priors.hub import PriorLoadError, cached_snapshot, locate, select_files
from dreamflow.priors.loading import load_diffusion_prior
from dreamflow.priors.sdxl_refiner import SdxlRefinerPrior
from dreamflow.priors.stable_diffusion import StableDiffusionPrior

#: The diffusers-relevant files of the real stabilityai/stable-diffusion-2-1 repository.
SD21_REPO_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v2-1_768-ema-pruned.ckpt", "v2-1_768-ema-pruned.safetensors",
    "v2-1_768-nonema-pruned.ckpt", "v2-1_768-nonema-pruned.safetensors", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
SD_PARTS = ("scheduler", "unet", "vae", "text_encoder", "tokenizer")


def test_only_the_used_parts_safetensors_are_chosen_in_the_requested_variant():
    files, weights, missing = select_files(SD21_REPO_FILES, SD_PARTS, None)
    assert not missing
    assert not [f for f in files if f.endswith((".bin", ".ckpt")) or "fp16" in f or "/" not in f and f != "model_index.json"]
    assert "unet/diffusion_pytorch_model.safetensors" in files and "feature_extractor/preprocessor_config.json" not in files
    half, weights, _ = select_files(SD21_REPO_FILES, SD_PARTS, "fp16")
    assert sorted(f for f in half if "safetensors" in f) == ["text_encoder/model.fp16.safetensors",
                                                       "unet/diffusion_pytorch_model.fp16.safetensors",
                                                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert weights["unet"].variant == "fp16" and weights["unet"].safetensors
    # D_phi's base loads no VAE; a part without safetensors falls back to its .bin, and only then.
    phi, _, _ = select_files(SD21_REPO_FILES, ("scheduler", "unet", "text_encoder", "tokenizer"), None)
    assert not [f for f in phi if f.startswith("vae/")]
    only_bin = [f for f in SD21_REPO_FILES if not (f.startswith("unet/") and f.endswith("safetensors"))]
    files, weights, _ = select_files(only_bin, SD_PARTS, None)
    assert weights["unet"].files == ("unet/diffusion_pytorch_model.bin",) and not weights["unet"].safetensors


def test_the_paper_models_load_by_id_from_the_offline_cache(hub_env):
    before = cache_listing(hub_env)
    prior = StableDiffusionPrior.from_pretrained(SD21_BASE)
    assert prior.prediction_type == "epsilon" and prior.model_id == SD21_BASE
    phi = StableDiffusionPrior.from_pretrained(SD21, load_vae=False)
    assert phi.prediction_type == "v_prediction" and phi.vae is None
    refiner = load_diffusion_prior(SDXL_REFINER, "refiner")
    assert isinstance(refiner, SdxlRefinerPrior)
    assert refiner.conditioner.requires_aesthetics_score and refiner.conditioner.time_ids(False).numel() == 5
    cond = refiner.condition("a red chair")
    x = torch.randn(1, 4, 8, 8)
    assert refiner.denoise(x, torch.tensor(1.0), cond).shape == x.shape
    assert cache_listing(hub_env) == before  # loading wrote nothing into the cache


def test_half_precision_reads_the_fp16_variant_and_float32_the_plain_weights(hub_env):
    snapshot = cached_snapshot(SD21_BASE)
    plain = load_file(str(snapshot / "unet" / "diffusion_pytorch_model.safetensors"))
    name = next(k for k in plain if k.endswith("conv_in.weight"))
    f32 = StableDiffusionPrior.from_pretrained(SD21_BASE, dtype="float32")
    assert torch.equal(dict(f32.unet.named_parameters())[name].detach(), plain[name])
    f16 = StableDiffusionPrior.from_pretrained(SD21_BASE, dtype="float16")
    got = dict(f16.unet.named_parameters())[name].detach()
    assert got.dtype == torch.float16 and torch.equal(got, (plain[name] * 0.5).half())


def test_a_model_missing_from_the_cache_is_one_line_naming_model_role_and_fix(hub_env):
    with pytest.raises(PriorLoadError) as err:
        StableDiffusionPrior.from_pretrained("stabilityai/stable-diffusion-2-base")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'stabilityai/stable-diffusion-2-base'" in msg and "prior.model" in msg
    assert "not in the Hugging Face cache" in msg and "dreamflow models fetch" in msg


def test_a_partly_downloaded_model_names_the_missing_part(hub_env, tmp_path, monkeypatch):
    home = tmp_path / "hf"
    shutil.copytree(hub_env, home, symlinks=True)
    monkeypatch.setenv("HF_HOME", str(home))
    (cached_snapshot(SD21_BASE) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    before = cache_listing(home)
    with pytest.raises(PriorLoadError, match=rf"^unet of model '{SD21_BASE}'.*partly downloaded"):
        StableDiffusionPrior.from_pretrained(SD21_BASE)
    assert cache_listing(home) == before


def test_a_gated_model_says_to_accept_the_licence(monkeypatch, tmp_path):
    from huggingface_hub import errors

    import huggingface_hub

    class Response:
        status_code = 403
        headers: dict = {}
        request = None

    def gated(*args, **kwargs):
        raise errors.GatedRepoError("Access to model is restricted", response=Response())

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", gated)  # the first request a download makes
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(PriorLoadError, match=r"gated.*accept its licence at https://huggingface.co/org/gated-model"):
        locate("org/gated-model", "prior")


def test_a_folder_that_is_not_a_diffusers_model_and_a_broken_index_are_named(tmp_path, tiny_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PriorLoadError, match="not a diffusers model folder"):
        StableDiffusionPrior.from_pretrained(str(empty))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    before = cache_listing(broken)
    with pytest.raises(PriorLoadError, match=r"model_index.json of model .*not valid JSON"):
        StableDiffusionPrior.from_pretrained(str(broken))
    assert cache_listing(broken) == before


def test_a_unet_with_the_wrong_in_channels_is_refused_by_name(tmp_path, tiny_folder):
    from diffusers import UNet2DConditionModel

    bad = tmp_path / "inpaint"
    shutil.copytree(tiny_folder, bad)
    unet = UNet2DConditionModel.from_pretrained(str(bad / "unet"))
    config = dict(unet.config)
    config["in_channels"] = 9
    UNet2DConditionModel.from_config(config).save_pretrained(str(bad / "unet"))
    with pytest.raises(PriorLoadError, match=r"^unet of model .*takes 9 input .*4-channel latents"):
        StableDiffusionPrior.from_pretrained(str(bad))


def test_an_sdxl_base_model_where_the_refiner_belongs_is_refused(tmp_path, hub_env):
    base = tmp_path / "sdxl-base"
    shutil.copytree(cached_snapshot(SDXL_REFINER), base)
    index = json.loads((base / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionXLPipeline", "requires_aesthetics_score": False})
    (base / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PriorLoadError, match="is an SDXL base model.*not the SDXL refiner.*refiner_model"):
        load_diffusion_prior(str(base), "refiner")
    # The refiner in the prior's place is refused too, by what it is.
    with pytest.raises(PriorLoadError, match="is an SDXL model.*Stable Diffusion 1.x/2.x"):
        StableDiffusionPrior.from_pretrained(SDXL_REFINER)


def test_a_stable_diffusion_model_can_refine_itself(hub_env):
    prior = load_diffusion_prior(SD21_BASE, "refiner")
    assert isinstance(prior, StableDiffusionPrior)


@pytest.fixture
def tiny_folder(offline_hub):
    """A plain diffusers folder (the SD 2.1-base snapshot, links resolved)."""
    return cached_snapshot(SD21_BASE, cache=offline_hub / "hub")


def test_under_the_server_an_id_shaped_name_never_probes_the_servers_folders(hub_env, tmp_path, monkeypatch):
    from dreamflow.priors.hub import SERVER_MODE_ENV

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "present").mkdir(parents=True)
    monkeypatch.setenv(SERVER_MODE_ENV, "1")
    messages = []
    for name in ("org/present", "org/absent"):
        with pytest.raises(PriorLoadError) as err:
            locate(name, "prior")
        messages.append(str(err.value).replace(name, "NAME"))
    assert messages[0] == messages[1]  # the same words whether a folder of that name exists here or not
    assert str(hub_env) not in messages[0]  # and no path of the server's
