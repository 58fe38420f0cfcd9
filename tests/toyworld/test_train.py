"""Training the toy generator: a run stopped after a checkpoint and resumed ends with the same
weights as the run that never stopped; fine-tuning starts from an earlier model; the training set
holds the oriented objects and normal maps with the captions the pipeline will ask for."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dreamflow.toyworld import GENERATOR_FOLDER
from dreamflow.toyworld.dataset import NORMAL_MAP_CAPTION
from dreamflow.toyworld.train import STATE_FILE, TrainConfig, cached_training_set, train, training_set
from dreamflow.toyworld.world import ALL_PROMPTS, ORIENTED_SHAPES

TINY = replace(TrainConfig(), views_per_object=1, oriented_views=1, normal_views=1, steps=4, batch=2, warmup=1,
               checkpoint_every=2)


@pytest.fixture(scope="module")
def data():
    return training_set(TINY, resolution=64, log=lambda line: None)


class Stop(Exception):
    pass


def _unet(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_the_training_set_has_every_object_and_normal_maps_captioned_for_the_geometry_stage(data):
    assert len(data) == 36 + 6 * len(ORIENTED_SHAPES) + 6 * (36 // 6 + len(ORIENTED_SHAPES))
    assert set(data.object_ids.tolist()) == set(range(len(ALL_PROMPTS)))
    normal = [i for i, c in enumerate(data.plain_captions) if c.endswith(f", {NORMAL_MAP_CAPTION}")]
    assert len(normal) == 6 * (36 // 6 + len(ORIENTED_SHAPES))
    for i in normal:
        assert data.plain_captions[i] == f"{ALL_PROMPTS[int(data.object_ids[i])]}, {NORMAL_MAP_CAPTION}"
        # The grey of NORMAL_BACKGROUND in the corner, not the colour renders' white.
        assert data.images[i, :, 0, 0].tolist() == [128, 128, 128]


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, data):
    whole = train(tmp_path / "whole", TINY, log=lambda line: None, vae_from=GENERATOR_FOLDER, data=data)

    def stop_at_checkpoint(line):
        if line.startswith("checkpoint"):
            raise Stop

    with pytest.raises(Stop):
        train(tmp_path / "cut", TINY, log=stop_at_checkpoint, vae_from=GENERATOR_FOLDER, data=data)
    assert (tmp_path / "cut" / "checkpoints" / "step-2" / STATE_FILE).is_file()
    assert not (tmp_path / "cut" / "generator").exists()
    lines = []
    resumed = train(tmp_path / "cut", TINY, log=lines.append, vae_from=GENERATOR_FOLDER, data=data, resume=True)
    assert any("resuming" in line and "step 2" in line for line in lines)
    assert not any(line.startswith("step 1/") for line in lines)
    a, b = _unet(whole), _unet(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_refused(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tmp_path, TINY, log=lambda line: None, vae_from=GENERATOR_FOLDER, data=data, resume=True)


def test_fine_tuning_starts_from_the_earlier_model_and_keeps_its_latent_scale(tmp_path, data):
    cfg = replace(TINY, steps=1, lr=0.0)
    out = train(tmp_path, cfg, log=lambda line: None, init_from=GENERATOR_FOLDER, data=data)
    a, b = _unet(GENERATOR_FOLDER), _unet(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json
    scale = lambda f: json.loads((f / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(out) == scale(GENERATOR_FOLDER)


def test_the_training_set_cache_is_reused_only_for_the_same_set(tmp_path, data):
    cache = tmp_path / "data.pt"
    torch.save({"key": None, "data": data}, cache)
    lines = []
    # A cache of another set is not taken for this one.
    small = replace(TINY, views_per_object=0, oriented_views=0, normal_views=1)
    first = cached_training_set(small, cache, log=lines.append)
    assert "another training set" in lines[0] and len(first) == 6 * (36 // 6 + len(ORIENTED_SHAPES))
    again = cached_training_set(small, cache, log=lines.append)
    assert torch.equal(again.images, first.images) and again.captions == first.captions
    assert lines[-1].startswith(f"{len(first)} training images from")
