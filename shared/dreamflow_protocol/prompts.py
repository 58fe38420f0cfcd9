"""The toy world's prompts in the forms people type: "an orange pyramid" -> "an orange square pyramid".

Pure Python, so the server (which owns the toy world's words) and the Blender add-on (which
learns them from the server's capabilities) read a prompt with the same function. The words are
data, a :class:`Vocabulary`; this module only knows how a prompt is put together: an optional
article (a/an/the, either one), a colour, a shape, each as the world names it, by one of its
synonyms, or (the shape) in the plural; a view suffix after a comma (", front view") is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

_ARTICLES = ("a", "an", "the")


class UnknownToyPrompt(ValueError):
    """A prompt the toy world cannot read; ``str()`` lists the words it knows."""


@dataclass(frozen=True)
class Vocabulary:
    """The toy world's words: canonical shapes and colours, and synonyms (word -> canonical word)."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    synonyms: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        canonical = set(self.shapes) | set(self.colours)
        wrong = sorted(f"{k} -> {v}" for k, v in self.synonyms.items() if v not in canonical)
        if wrong:
            raise ValueError(f"synonyms must name one of the world's shapes or colours: {', '.join(wrong)}")

    def prompt_for(self, shape: str, colour: str) -> str:
        """The world's own prompt for one object: "a red cube", "an orange torus"."""
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"

    def as_fields(self) -> dict[str, Any]:
        """The vocabulary as plain data (a capabilities field)."""
        return {"shapes": list(self.shapes), "colours": list(self.colours), "synonyms": dict(self.synonyms)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "Vocabulary":
        """The vocabulary a server published with :meth:`as_fields`."""
        return cls(tuple(fields["shapes"]), tuple(fields["colours"]), dict(fields.get("synonyms") or {}))


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt read against the toy world: its object and the world's own prompt for it."""

    shape: str
    colour: str
    prompt: str


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s")


def _forms(vocab: Vocabulary) -> tuple[dict[str, str], dict[str, str]]:
    """Every accepted spelling of a colour and of a shape, each mapped to the world's word."""
    colours = {c: c for c in vocab.colours}
    shapes = {s: s for s in vocab.shapes}
    for word, meant in vocab.synonyms.items():
        (colours if meant in vocab.colours else shapes)[_normalise(word)] = meant
    for form, meant in list(shapes.items()):
        shapes.setdefault(_plural(form), meant)
    return colours, shapes


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("-", " ").strip().lower())


def read_toy_prompt(prompt: str, vocab: Vocabulary) -> ToyPrompt:
    """The toy world's object and canonical prompt for ``prompt``; UnknownToyPrompt naming the known words otherwise."""
    base = _normalise(prompt.split(",")[0]).rstrip(".!")
    words = base.split(" ")
    if words and words[0] in _ARTICLES:
        words = words[1:]
    rest = " ".join(words)
    colours, shapes = _forms(vocab)
    for colour_form, colour in colours.items():
        if rest.startswith(colour_form + " ") and rest[len(colour_form) + 1:] in shapes:
            shape = shapes[rest[len(colour_form) + 1:]]
            return ToyPrompt(shape, colour, vocab.prompt_for(shape, colour))
    raise UnknownToyPrompt(_refusal(prompt, base, vocab, colours, shapes))


def _refusal(prompt: str, base: str, vocab: Vocabulary, colours: dict[str, str], shapes: dict[str, str]) -> str:
    known = {w for form in (*colours, *shapes) for w in form.split()} | set(_ARTICLES)
    unknown = sorted(set(re.findall(r"[a-z]+", base)) - known)
    hint = f" (unknown word{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)})" if unknown else ""
    grouped: dict[str, list[str]] = {}
    for word, meant in vocab.synonyms.items():
        grouped.setdefault(meant, []).append(word)
    also = "; also " + ", ".join("/".join(words) + f" ({meant})" for meant, words in grouped.items()) if grouped else ""
    example = vocab.prompt_for(vocab.shapes[0], vocab.colours[0])
    return (f"the toy world does not know the prompt {prompt!r}{hint}. It knows {len(vocab.shapes) * len(vocab.colours)} "
            f"objects, written '<colour> <shape>' with or without an article: colours {', '.join(vocab.colours)}; "
            f"shapes {', '.join(vocab.shapes)}{also}. Example: {example!r}")
