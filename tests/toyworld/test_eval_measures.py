"""The toy evaluator and the asset measures: the true object scores perfectly, a wrong one does not,
and the shipped evaluator classifies renders it never saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamflow.config import ConfigError
from dreamflow.export.files import read_glb, write_glb
from dreamflow.toyworld.evaluate import (Renderable, evaluation_cameras, ground_truth_measures, retrieve, score_asset,
                                         srgb_to_lab, textured_true_object, true_object)
from dreamflow.toyworld.evaluator import HELD_OUT_SEED, TRAIN_SEED, accuracy, load_evaluator, render_labelled
from dreamflow.toyworld.scoring import ToyScorer
from dreamflow.toyworld.world import ALL_SHAPES, COLOURS, ORIENTED_SHAPES, SHAPES, prompt_for

#: One prompt per shape, every colour once.
DIAGONAL = [prompt_for(s, c) for s, c in zip(SHAPES, COLOURS)]
VIEWS = 12


@pytest.fixture(scope="module")
def scorer():
    return ToyScorer(load_evaluator())


def test_shipped_evaluator_classifies_renders_of_an_unseen_seed():
    model = load_evaluator()
    seed = HELD_OUT_SEED + 1  # neither its training seed nor the seed of its reported held-out set
    assert seed not in (TRAIN_SEED, HELD_OUT_SEED)
    acc = accuracy(model, *render_labelled(seed, 4, model.config))
    assert acc["images"] == 6 * len(model.config.shapes) * 4
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.98
    if model.view_head is not None:  # front, side or back of the oriented objects
        assert acc["view_images"] == 6 * len(ORIENTED_SHAPES) * 4 and acc["view"] >= 0.85


def test_shipped_evaluator_report_names_its_held_out_accuracy():
    import json

    from dreamflow.toyworld.evaluator import CONFIG_FILE, SHIPPED

    meta = json.loads((SHIPPED / CONFIG_FILE).read_text())
    held = meta["report"]["held_out"]
    assert held["images"] >= 6 * len(meta["config"]["shapes"]) * 12 and held["shape"] >= 0.95 and held["colour"] >= 0.98
    assert tuple(meta["config"]["shapes"]) in (SHAPES, ALL_SHAPES) and tuple(meta["config"]["colours"]) == COLOURS
    if meta["config"].get("views"):
        assert held["view"] >= 0.9


@pytest.mark.parametrize("prompt", DIAGONAL)
def test_true_object_has_r_precision_one_and_perfect_ground_truth(scorer, prompt):
    r = score_asset(true_object(prompt), prompt, scorer, views=VIEWS)
    assert r["r_precision"] == 1.0 and r["asset_top1"] and r["most_retrieved"] == prompt
    assert r["prompt_set_size"] == 36 and r["views"] == VIEWS
    assert r["chamfer_rel"] < 0.01            # two independent surface samplings of one mesh
    assert r["silhouette_iou"] > 0.999
    assert r["colour_error"] < 0.5
    assert r["normal_consistency"] > 0.99 and r["area_ratio"] == pytest.approx(1.0, abs=0.01)
    assert r["chamfer_aligned"] < 0.01 and r["half_extent"] == pytest.approx(r["true_half_extent"])
    assert r["colour_noise"] == pytest.approx(r["true_colour_noise"]) and r["colour_noise"] < 3.0


def test_wrong_object_scores_low_on_every_measure(scorer):
    r = score_asset(true_object("a red cube"), "a blue sphere", scorer, views=VIEWS)
    assert r["r_precision"] <= 0.1 and not r["asset_top1"]
    assert r["chamfer_rel"] > 0.03 and r["silhouette_iou"] < 0.8 and r["colour_error"] > 50


def test_ground_truth_separates_shape_from_colour():
    cams = evaluation_cameras(8)
    truth = true_object("a blue sphere")
    other_colour = ground_truth_measures(true_object("a red sphere"), truth, cams, resolution=64)
    other_shape = ground_truth_measures(true_object("a blue cube"), truth, cams, resolution=64)
    assert other_colour["chamfer_rel"] < 0.01 and other_colour["silhouette_iou"] > 0.999
    assert other_colour["colour_error"] > 50
    assert other_shape["chamfer_rel"] > 0.03 and other_shape["silhouette_iou"] < 0.9
    assert other_shape["colour_error"] < 10   # same albedo; only the shading's mix of light differs


def test_a_baked_glb_of_the_true_object_scores_like_the_true_object(scorer, tmp_path):
    prompt = "an orange torus"
    write_glb(textured_true_object(prompt), tmp_path / "model.glb")
    r = score_asset(read_glb(tmp_path / "model.glb"), prompt, scorer, views=VIEWS)
    assert r["r_precision"] == 1.0
    assert r["chamfer_rel"] < 0.01 and r["silhouette_iou"] > 0.99 and r["colour_error"] < 2.0
    assert r["normal_consistency"] > 0.99 and r["colour_noise"] < r["true_colour_noise"] + 1.0


def test_retrieval_adds_the_asset_prompt_to_the_set_and_counts_views(scorer):
    images, _ = true_object("a red cube").render(evaluation_cameras(4), scorer.resolution)
    r = retrieve(scorer, images, "A  Red Cube", ["a blue cube", "a red sphere"])
    assert r["prompt_set_size"] == 3 and r["r_precision"] == 1.0 and r["views_right"] == 4
    r = retrieve(scorer, images, "a red sphere", ["a red cube", "a red sphere"])
    assert r["r_precision"] == 0.0 and r["most_retrieved"] == "a red cube"


def test_toy_scorer_refuses_a_prompt_the_world_does_not_know(scorer):
    images = torch.ones(1, 3, scorer.resolution, scorer.resolution)
    with pytest.raises(ConfigError, match="colours red, green"):
        retrieve(scorer, images, "a wooden chair", ["a red cube"])


def test_colour_space_is_cielab():
    lab = srgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)


def test_an_asset_without_colour_is_refused():
    from dreamflow.export.mesh import MeshData, MeshError

    bare = true_object("a red cube").mesh
    with pytest.raises(MeshError, match="no texture"):
        Renderable(MeshData(bare.vertices, bare.faces)).render(evaluation_cameras(2), 32)


def test_judge_counts_samples_that_show_their_prompt():
    from dreamflow.toyworld.dataset import render_object
    from dreamflow.toyworld.evaluator import judge

    model = load_evaluator()
    images, _ = render_object("cone", "yellow", evaluation_cameras(4), model.config.render_resolution)
    right = judge(model, images, ["a yellow cone"] * 4)
    assert right == {"shape": 1.0, "colour": 1.0, "both": 1.0, "images": 4}
    wrong = judge(model, images, ["a yellow cube", "a red cone", "a red cube", "a yellow cone"])
    assert wrong["shape"] == 0.5 and wrong["colour"] == 0.5 and wrong["both"] == 0.25
