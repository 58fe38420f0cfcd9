"""The evaluator knows the oriented objects and has a view head: its labels come from the camera,
its training never mirrors an oriented object (a mirrored front is another view), and evaluators
saved before the oriented objects still load."""

from dataclasses import replace

import torch

from dreamflow.scene.cameras import view_suffix
from dreamflow.toyworld.evaluator import (VIEWS, EvaluatorConfig, augment, load_evaluator, render_labelled,
                                          train_evaluator)
from dreamflow.toyworld.world import ALL_SHAPES, COLOURS, ORIENTED_SHAPES, SHAPES

TINY = EvaluatorConfig(resolution=16, render_resolution=16, width=8, shapes=ALL_SHAPES, colours=COLOURS, views=VIEWS,
                       views_per_object=2, held_out_views=1, steps=3, batch=16)


def test_view_labels_come_from_the_camera_and_only_oriented_objects_have_one():
    images, shapes, colours, views = render_labelled(11, 2, TINY)
    assert len(images) == 2 * 6 * len(ALL_SHAPES) and images.shape[-1] == 16
    from dreamflow.toyworld.dataset import render_dataset

    cams = render_dataset(2, 16, 11, shapes=ALL_SHAPES, real_bias=False).cameras
    for i in range(len(images)):
        name = TINY.shapes[int(shapes[i])]
        if name in ORIENTED_SHAPES:
            want = view_suffix(float(cams.azimuth_deg[i]), float(cams.elevation_deg[i])).removesuffix(" view")
            assert VIEWS[int(views[i])] == want
        else:
            assert int(views[i]) == -1


def test_augment_mirrors_only_what_it_may():
    half = torch.zeros(32, 3, 8, 8)
    half[..., :4] = 1.0  # left half white: a mirror moves it right

    def mirrored(flippable):
        out = augment(half, torch.Generator().manual_seed(0), flippable=flippable)
        return out[..., :2].mean((1, 2, 3)) < out[..., 6:].mean((1, 2, 3))

    assert bool(mirrored(None).any())
    assert not bool(mirrored(torch.zeros(32, dtype=torch.bool)).any())


def test_a_trained_evaluator_saves_and_loads_its_view_head(tmp_path):
    model, report = train_evaluator(tmp_path, TINY, log=lambda line: None)
    assert 0.0 <= report["held_out"]["view"] <= 1.0 and report["held_out"]["view_images"] == 6 * len(ORIENTED_SHAPES)
    loaded = load_evaluator(tmp_path)
    images = render_labelled(12, 1, TINY)[0][:5]
    assert loaded.classify_views(images) == model.classify_views(images)
    assert set(loaded.classify_views(images)) <= set(VIEWS)


def test_an_evaluator_from_before_the_oriented_objects_loads_without_a_view_head(tmp_path):
    old = replace(TINY, shapes=SHAPES, views=(), steps=1)
    train_evaluator(tmp_path, old, log=lambda line: None)
    import json

    meta = json.loads((tmp_path / "evaluator.json").read_text())
    del meta["config"]["views"]
    (tmp_path / "evaluator.json").write_text(json.dumps(meta))
    model = load_evaluator(tmp_path)
    assert model.view_head is None and model.config.shapes == SHAPES
    assert len(render_labelled(11, 1, model.config)[0]) == 36
