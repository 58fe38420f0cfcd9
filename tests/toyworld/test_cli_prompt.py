"""`dreamflow demo` and `generate` say in one line which prompt a toy-world job runs, and refuse the rest."""

from __future__ import annotations

import argparse

import pytest

from dreamflow.cli import generate


def _args(**kw) -> argparse.Namespace:
    base = dict(preset=None, seed=None, method=None, device=None, overrides=[], out="unused", reference=None,
                negative_prompt=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def ran(monkeypatch) -> list:
    """The configurations the commands would run (the job itself is another test's business)."""
    configs: list = []
    monkeypatch.setattr(generate, "_run", lambda config, out, label: configs.append(config) or 0)
    return configs


def test_demo_and_generate_run_the_worlds_prompt_and_say_it_once(ran, capsys):
    assert generate.cmd_demo(_args(prompt="an orange pyramid")) == 0
    assert generate.cmd_generate(_args(prompt="a orange ball", preset="toy")) == 0
    assert [c.prompt for c in ran] == ["an orange square pyramid", "an orange sphere"]
    err = capsys.readouterr().err.splitlines()
    assert err == ["using 'an orange square pyramid' (the toy world's words for 'an orange pyramid')",
                   "using 'an orange sphere' (the toy world's words for 'a orange ball')"]


def test_the_worlds_own_prompt_and_other_presets_are_run_as_given_without_a_word(ran, capsys):
    assert generate.cmd_demo(_args(prompt="a red cube")) == 0
    assert generate.cmd_generate(_args(prompt="an orange pyramid", preset="smoke")) == 0
    assert [c.prompt for c in ran] == ["a red cube", "an orange pyramid"]
    assert capsys.readouterr().err == ""


def test_an_unknown_word_is_still_refused_with_the_known_words(ran, capsys):
    assert generate.cmd_demo(_args(prompt="a wooden chair")) == 2
    err = capsys.readouterr().err
    assert ran == [] and "unknown words: chair, wooden" in err and "square pyramid" in err
