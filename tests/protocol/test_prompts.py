"""The toy world's prompt reader in the protocol package: words as data, the same answers on both
sides of the wire, and the capabilities field that carries them (only to clients that know it)."""

from __future__ import annotations

import pytest

from dreamflow_protocol import Message, ProtocolError, decode, encode
from dreamflow_protocol.prompts import UnknownToyPrompt, Vocabulary, read_toy_prompt
from dreamflow_protocol.schema import NEWER_CAPABILITIES, capabilities_for, version_tuple

WORDS = Vocabulary(("box", "flat disc"), ("amber", "teal"), {"crate": "box", "coin": "flat disc", "cyan": "teal"})


@pytest.mark.parametrize("typed, canonical", [
    ("an amber box", "an amber box"), ("a amber box", "an amber box"), ("the amber box", "an amber box"),
    ("amber boxes", "an amber box"), ("A  Teal   Crate!", "a teal box"), ("cyan coins, seen from above", "a teal flat disc"),
    ("teal flat-discs", "a teal flat disc"),
])
def test_any_vocabulary_is_read_by_its_own_words(typed, canonical):
    assert read_toy_prompt(typed, WORDS).prompt == canonical


def test_a_refusal_names_the_unknown_words_and_every_known_one():
    with pytest.raises(UnknownToyPrompt) as err:
        read_toy_prompt("an amber barrel", WORDS)
    text = str(err.value)
    assert "'an amber barrel' (unknown word: barrel)" in text
    assert "colours amber, teal; shapes box, flat disc; also crate (box), coin (flat disc), cyan (teal)" in text
    with pytest.raises(UnknownToyPrompt):
        read_toy_prompt("amber", WORDS)


def test_a_synonym_must_mean_one_of_the_worlds_words():
    with pytest.raises(ValueError, match="crate -> barrel"):
        Vocabulary(("box",), ("amber",), {"crate": "barrel"})


def test_the_published_vocabulary_reads_prompts_exactly_as_the_server_does():
    from dreamflow.toyworld.world import PROMPTS, VOCABULARY, read_prompt

    published = Vocabulary.from_fields(VOCABULARY.as_fields())
    for typed in ("an orange pyramid", "a orange cube", "red balls", "the violet donut", *PROMPTS):
        assert read_toy_prompt(typed, published) == read_prompt(typed)


def _capabilities(**extra) -> dict:
    return {"protocol": 1, "server_version": "0", "server_id": "s", "device": "cpu", "accelerators": {}, "presets": ["toy"],
            "methods": ["apfo"], "start_stages": [], "limits": {}, "max_queue": 1, "auth": "none", **extra}


def test_preset_details_are_checked_on_the_wire():
    good = {"paper": {"runnable": False, "reason": "no CUDA", "fix": "use a GPU"},
            "toy": {"runnable": True, "prompts": WORDS.as_fields()}}
    msg = decode(encode(Message("capabilities", _capabilities(preset_details=good))))
    assert msg.fields["preset_details"] == good
    for bad in ({"toy": {"runnable": "yes"}}, {"toy": {"runnable": True, "colour": "red"}},
                {"toy": {"runnable": True, "prompts": {"shapes": ["box"]}}}):
        with pytest.raises(ProtocolError):
            encode(Message("capabilities", _capabilities(preset_details=bad)))


def test_newer_capabilities_go_only_to_clients_that_know_them():
    fields = _capabilities(preset_details={"toy": {"runnable": True}})
    assert version_tuple("0.2.0") == (0, 2, 0) and version_tuple("1") == (1,) and version_tuple("blender") == ()
    assert NEWER_CAPABILITIES["preset_details"] == (0, 2, 0)
    for old in (None, "", "0.1.0", "a client"):
        assert capabilities_for(fields, old) == _capabilities()
    for new in ("0.2.0", "0.10", "1.0"):
        assert capabilities_for(fields, new) == fields


def test_the_client_library_says_its_version_in_hello(make_server, make_client):
    import dreamflow_protocol

    srv = make_server()
    client = make_client(srv.endpoint)
    assert "preset_details" in client.capabilities
    assert dreamflow_protocol.__version__ == "0.2.0"
    # A hello as a 0.1.0 client sends it gets the capabilities such a client can decode.
    old = client.request(Message("hello", {"client": "old add-on"}))
    assert "preset_details" not in old.fields and old.fields["presets"] == client.capabilities["presets"]
