"""``dreamflow eval``: the table and JSON, the real-CLIP path (a tiny random CLIP saved in-process),
the error paths, and the demo's toy-world report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamflow.cli import main
from dreamflow.export.files import write_glb
from dreamflow.toyworld.evaluate import textured_true_object

PROMPT = "a blue cylinder"


@pytest.fixture(scope="module")
def asset(tmp_path_factory) -> Path:
    """An asset folder as `dreamflow generate` writes it, holding the true object (baked)."""
    folder = tmp_path_factory.mktemp("asset")
    write_glb(textured_true_object(PROMPT, 128), folder / "model.glb")
    (folder / "report.json").write_text(json.dumps({"prompt": PROMPT, "files": {"model": "model.glb"}}))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIPModel with the real CLIP BPE tokenizer, written with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    from dreamflow.priors.tiny import clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def test_eval_prints_a_table_and_writes_json(asset, tmp_path, capsys):
    out = tmp_path / "all.json"
    assert main(["eval", str(asset), "--views", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert PROMPT in text and "8/8" in text and "R-precision" in text
    per_asset = json.loads((asset / "eval.json").read_text())
    assert per_asset["r_precision"] == 1.0 and per_asset["views"] == 8 and per_asset["scorer"] == "toy-evaluator"
    assert per_asset["silhouette_iou"] > 0.99
    both = json.loads(out.read_text())
    assert both["mean"]["r_precision"] == 1.0 and len(both["assets"]) == 1


def test_eval_with_a_real_clip_model_from_a_local_folder(asset, tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# distractors\na wooden chair\na red cube\n\n")
    out = tmp_path / "clip.json"
    rc = main(["eval", str(asset), "--clip", str(tiny_clip), "--prompts", str(prompts), "--views", "4", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    row = json.loads(out.read_text())["assets"][0]
    assert row["scorer"] == str(tiny_clip)
    assert row["prompt_set_size"] == 3                       # the asset's own prompt joins the two distractors
    assert 0.0 <= row["r_precision"] <= 1.0 and row["views_right"] == round(4 * row["r_precision"])
    assert row["chamfer_rel"] < 0.01                          # ground truth does not depend on the scorer


def test_clip_scores_are_the_models_image_text_logits(tiny_clip):
    from dreamflow.toyworld.scoring import ClipScorer

    scorer = ClipScorer(str(tiny_clip))
    images = torch.rand(2, 3, 32, 32)
    scores = scorer.scores(images, ["a red cube", "a wooden chair"])
    ids = scorer.tokenizer(["a red cube", "a wooden chair"], padding=True, return_tensors="pt")
    x = (images - scorer.mean) / scorer.std
    with torch.no_grad():
        img = scorer.model.vision_model(pixel_values=x).pooler_output
        txt = scorer.model.text_model(**ids).pooler_output
        img = torch.nn.functional.normalize(scorer.model.visual_projection(img), dim=-1)
        txt = torch.nn.functional.normalize(scorer.model.text_projection(txt), dim=-1)
    torch.testing.assert_close(scores, scorer.model.logit_scale.exp() * img @ txt.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/asset"], "no asset there"),
    (["--views", "0"], "--views must be at least 1"),
    (["--clip", "/nonexistent/clip-model"], "could not load CLIP model '/nonexistent/clip-model': no such folder"),
    (["--clip", "openai/clip-vit-large-patch14"], "hf download openai/clip-vit-large-patch14"),
    (["--prompt", "a wooden chair"], "the toy world does not know the prompt 'a wooden chair'"),
])
def test_eval_errors_are_one_line(asset, args, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["eval"] + (args if args[0].startswith("/nonexistent/a") else [str(asset)] + args)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_eval_errors_on_an_empty_prompt_file_and_a_missing_prompt(asset, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["eval", str(asset), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.glb").write_bytes((asset / "model.glb").read_bytes())
    assert main(["eval", str(bare)]) == 2
    assert "pass it with --prompt" in capsys.readouterr().err


def test_the_demo_report_gets_the_toy_evaluation_and_the_reference_demo_does_not(asset, tmp_path):
    from dreamflow.cli.evaluate import add_toy_quality, format_toy_quality
    from dreamflow.pipeline.config import build_config

    out = tmp_path / "job"
    out.mkdir()
    (out / "model.glb").write_bytes((asset / "model.glb").read_bytes())
    report = {"prompt": PROMPT, "files": {"model": "model.glb"}, "quality": {}}
    (out / "report.json").write_text(json.dumps(report))
    reference = build_config("smoke", {}, prompt=PROMPT)          # the smoke preset uses the reference prior
    assert reference.prior.kind == "reference"
    assert add_toy_quality(reference, out, dict(report)) is None
    assert json.loads((out / "report.json").read_text()) == report

    text_to_3d = build_config("smoke", {"prior.kind": "tiny"}, prompt=PROMPT)
    result = add_toy_quality(text_to_3d, out, dict(report), views=8)
    written = json.loads((out / "report.json").read_text())
    assert written["toy_eval"] == result and result["r_precision"] == 1.0
    assert "R-precision 1.000 (8/8 views" in format_toy_quality(result)
    unknown = build_config("smoke", {"prior.kind": "tiny"}, prompt="a wooden chair")
    assert add_toy_quality(unknown, out, dict(report)) is None
