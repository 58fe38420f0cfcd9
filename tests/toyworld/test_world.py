"""The toy world: its 36 prompts, the geometry of its objects, deterministic captioned renders,
and the clear error for a prompt it does not know."""

import pytest
import torch

from dreamflow.config import ConfigError
from dreamflow.scene.cameras import Cameras, view_suffix
from dreamflow.pipeline.config import build_config
from dreamflow.toyworld.dataset import (BACKGROUND, ORIENTED_FRONT_SHARE, ORIENTED_VIEW_CAPTIONED, front_biased,
                                        render_dataset, render_object)
from dreamflow.toyworld.world import (ALL_PROMPTS, COLOURS, ORIENTED_PROMPTS, ORIENTED_SHAPES, PROMPTS, SHAPES,
                                      object_index, object_mesh, parse_prompt, prompt_for, read_prompt)


def test_the_36_prompts_are_the_issues_words():
    assert len(PROMPTS) == len(set(PROMPTS)) == 36
    assert "a red cube" in PROMPTS and "an orange torus" in PROMPTS and "a purple square pyramid" in PROMPTS
    for shape in SHAPES:
        for colour in COLOURS:
            assert parse_prompt(prompt_for(shape, colour)) == (shape, colour)
    assert parse_prompt("  A Red   Cube, front view ") == ("cube", "red")


def test_an_unknown_prompt_names_the_words_the_world_knows():
    with pytest.raises(ConfigError) as err:
        parse_prompt("a pink dog")
    msg = str(err.value)
    assert "pink" in msg and "dog" in msg
    assert all(c in msg for c in COLOURS) and all(s in msg for s in SHAPES)
    assert "pyramid/square based pyramid (square pyramid)" in msg   # and the synonyms it reads


@pytest.mark.parametrize("typed, canonical", [
    ("an orange pyramid", "an orange square pyramid"),      # the issue's first toy prompt
    ("a orange cube", "an orange cube"),                      # either article
    ("an orange ball", "an orange sphere"),
    ("the red donut", "a red torus"),
    ("Blue Cubes.", "a blue cube"),                          # no article, a plural, a full stop
    ("green tori, front view", "a green torus"),             # an irregular plural, a view suffix
    ("a violet square-based pyramid", "a purple square pyramid"),
    ("yellow boxes", "a yellow cube"),                       # the plural of a synonym
])
def test_the_obvious_forms_read_as_the_worlds_prompt(typed, canonical):
    read = read_prompt(typed)
    assert read.prompt == canonical and read.prompt in PROMPTS
    assert parse_prompt(typed) == (read.shape, read.colour)


@pytest.mark.parametrize("typed, unknown", [
    ("a pink cube", "pink"), ("a red dog", "dog"), ("a red", None), ("cube red", None), ("a red cube cube", None),
    ("a red green cube", None), ("two red cubes", "two"),
])
def test_words_the_world_does_not_know_are_still_refused(typed, unknown):
    with pytest.raises(ConfigError, match="toy world does not know the prompt") as err:
        read_prompt(typed)
    if unknown:
        assert f"unknown word: {unknown}" in str(err.value)


def test_a_toy_job_is_configured_with_the_worlds_prompt_and_other_models_keep_theirs():
    assert build_config("toy", prompt="an orange pyramid").prompt == "an orange square pyramid"
    assert build_config("toy", prompt="a red cube").prompt == "a red cube"
    assert build_config("paper", prompt="an orange pyramid").prompt == "an orange pyramid"  # SD reads any prompt
    with pytest.raises(ConfigError, match="unknown word: chair"):
        build_config("toy", prompt="a red chair")


def _centred_filling_the_box(shape):
    m = object_mesh(shape)
    lo, hi = m.vertices.min(0).values, m.vertices.max(0).values
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-5)
    assert float((hi - lo).max()) == pytest.approx(0.8, abs=1e-5)
    return m


@pytest.mark.parametrize("shape", SHAPES)
def test_each_object_is_centred_in_the_box_and_fills_most_of_it(shape):
    m = _centred_filling_the_box(shape)
    assert bool((m.vertices.abs() <= 0.5).all())
    # Outward normals and outward-facing triangles (the rasteriser's antialiasing reads facing).
    centre_of_tube = m.vertices.clone()
    if shape == "torus":
        ring = torch.nn.functional.normalize(m.vertices[:, :2], dim=1) * 0.28
        centre_of_tube = m.vertices - torch.cat([ring, torch.zeros(len(ring), 1)], 1)
    assert bool(((m.normals * centre_of_tube).sum(1) > -1e-6).all())
    tri = m.vertices[m.faces]
    face_n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    facing = (face_n * m.normals[m.faces].mean(1)).sum(1)
    real = face_n.norm(dim=1) > 1e-8  # the sphere's pole triangles have no area
    assert bool((facing[real] > 0).all())


def test_objects_stand_upright_and_the_torus_lies_flat_with_its_hole_up():
    for shape in ("cone", "square pyramid"):
        v = object_mesh(shape).vertices
        top = v[v[:, 2] > 0.399]
        assert torch.allclose(top[:, :2], torch.zeros_like(top[:, :2]), atol=1e-5)  # the apex points up (+Z)
    torus = object_mesh("torus").vertices
    assert float(torus[:, 2].max() - torus[:, 2].min()) == pytest.approx(0.24, abs=1e-4)
    # From straight above the hole shows the background; from the side the tube covers the centre.
    above = Cameras.make(0.0, 89.0, 1.5, 50.0)
    side = Cameras.make(0.0, 0.0, 1.5, 50.0)
    _, a_up = render_object("torus", "red", above, 33)
    _, a_side = render_object("torus", "red", side, 33)
    assert float(a_up[0, 0, 16, 16]) == 0.0 and float(a_up.mean()) > 0.1
    assert float(a_side[0, 0, 16, 16]) == 1.0


def test_renders_are_deterministic_captioned_and_over_the_white_background():
    a = render_dataset(2, 24, seed=5)
    b = render_dataset(2, 24, seed=5)
    c = render_dataset(2, 24, seed=6)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert len(a) == 72 and a.images.dtype == torch.uint8
    for i in range(len(a)):
        k = int(a.object_ids[i])
        az, el = float(a.cameras.azimuth_deg[i]), float(a.cameras.elevation_deg[i])
        assert a.captions[i] == f"{PROMPTS[k]}, {view_suffix(az, el)}"
    assert bool((a.images[:, :, 0, 0] == round(255 * BACKGROUND)).all())  # corners are background
    # The colour word decides the hue: red renders are red-dominant, blue ones blue-dominant.
    img = a.float_images()
    red = img[a.colour_ids == COLOURS.index("red")]
    fg = (red < 0.9).any(1, keepdim=True).expand_as(red)
    means = [red[:, ch][fg[:, ch]].mean() for ch in range(3)]
    assert means[0] > means[1] + 0.3 and means[0] > means[2] + 0.3


def test_the_oriented_objects_sit_beside_the_36_and_parse():
    assert len(ORIENTED_PROMPTS) == 6 * len(ORIENTED_SHAPES) >= 18 and ALL_PROMPTS == PROMPTS + ORIENTED_PROMPTS
    assert "a red mug" in ORIENTED_PROMPTS and "an orange house" in ORIENTED_PROMPTS
    for shape in ORIENTED_SHAPES:
        for colour in COLOURS:
            assert parse_prompt(f"{prompt_for(shape, colour)}, back view") == (shape, colour)
            assert ALL_PROMPTS[object_index(shape, colour)] == prompt_for(shape, colour)
    assert all(ALL_PROMPTS[object_index(*parse_prompt(p))] == p for p in PROMPTS)


@pytest.mark.parametrize("shape", ORIENTED_SHAPES)
def test_an_oriented_object_is_closed_centred_and_its_front_differs_from_its_back_and_sides(shape):
    m = _centred_filling_the_box(shape)
    tri = m.vertices[m.faces]
    face_n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    assert bool(((face_n * m.normals[m.faces].mean(1)).sum(1) > 0).all())  # the given normals face out
    assert float((tri[:, 0] * torch.linalg.cross(tri[:, 1], tri[:, 2], dim=1)).sum()) > 0  # outward triangles
    views = Cameras.make(torch.tensor([0.0, 180.0, 90.0, -90.0]), 10.0, 1.5, 50.0)
    _, alpha = render_object(shape, "red", views, 32)
    front, back, right, left = alpha[:, 0] > 0.5

    def iou(a, b):
        return float((a & b).sum() / (a | b).sum())

    assert iou(front, back) < 0.9 and iou(front, right) < 0.9 and iou(front, left) < 0.9
    _, cube = render_object("cube", "red", views[:2], 32)
    assert iou(*(cube[:, 0] > 0.5)) > 0.97  # a symmetric shape looks the same from the back


def test_oriented_training_views_are_front_biased_and_mostly_uncaptioned_for_the_view():
    cams = front_biased(Cameras.make(torch.zeros(4000), 10.0, 1.5, 50.0), torch.Generator().manual_seed(0))
    near = cams.azimuth_deg.abs() <= 45.0
    assert float(near.float().mean()) == pytest.approx(ORIENTED_FRONT_SHARE, abs=0.03)
    assert bool((cams.azimuth_deg.abs() <= 180.0).all())
    assert float(cams.azimuth_deg[~near].abs().mean()) == pytest.approx(112.5, abs=5.0)  # the rest spread evenly
    data = render_dataset(8, 16, seed=3, shapes=ORIENTED_SHAPES)
    assert len(data) == 8 * len(ORIENTED_PROMPTS)
    named = 0
    for i in range(len(data)):
        prompt = ALL_PROMPTS[int(data.object_ids[i])]
        az, el = float(data.cameras.azimuth_deg[i]), float(data.cameras.elevation_deg[i])
        assert data.plain_captions[i] == prompt
        assert data.captions[i] in (prompt, f"{prompt}, {view_suffix(az, el)}")
        named += data.captions[i] != prompt
    assert abs(named / len(data) - ORIENTED_VIEW_CAPTIONED) < 0.15


def test_a_toy_model_refuses_an_object_it_was_not_trained_on_and_publishes_only_what_it_learnt(tmp_path):
    import json

    from dreamflow.toyworld.world import MARKER_FILE, model_vocabulary, prompt_for_model

    (tmp_path / MARKER_FILE).write_text(json.dumps({"prompts": list(PROMPTS)}))
    assert prompt_for_model(str(tmp_path), "a red cube, front view") == "a red cube"
    with pytest.raises(ConfigError, match="not trained on 'a red mug'"):
        prompt_for_model(str(tmp_path), "red mugs")
    assert model_vocabulary(str(tmp_path)).shapes == SHAPES
    (tmp_path / MARKER_FILE).write_text(json.dumps({"prompts": list(ALL_PROMPTS)}))
    assert prompt_for_model(str(tmp_path), "red mugs") == "a red mug"
    assert set(model_vocabulary(str(tmp_path)).shapes) == set(SHAPES + ORIENTED_SHAPES)
