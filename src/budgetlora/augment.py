"""Word-level noise that makes clean AG News text look like the machine-generated half of the competition test file.

That half reads like garbled news: word salad, repeated or inserted words, local shuffles, odd swaps of names and
numbers. Training on noisy copies of clean texts exposes the classifier to that style without new labels. Text is
split on whitespace, so punctuation stays attached to its word; swaps replace only the word's core between any
leading and trailing punctuation ("(Reuters)" -> "(Yankees)", "$1,200" -> "$7,415").
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

# A word's core between leading and trailing punctuation; the core keeps inner punctuation ("Street's", "U.S").
WORD_PARTS = re.compile(r"^(\W*)(.*?)(\W*)$")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
SENTENCE_END = (".", "!", "?")
# local_shuffle moves a word at most this many positions away from where it started.
SHUFFLE_WINDOW = 3


@dataclass(frozen=True)
class NoiseSettings:
    """Per-word probabilities of each kind of noise; all zero leaves text unchanged."""

    word_dropout: float = 0.1
    local_shuffle: float = 0.1
    repeat: float = 0.05
    insert: float = 0.05
    entity_swap: float = 0.1
    number_swap: float = 0.5

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # bool is an int, but True as a probability is a typo, not a choice.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"NoiseSettings.{field.name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class EntityPool:
    """Capitalised words that entity_swap draws from, and the words insert draws from (the text's own when empty)."""

    entities: tuple[str, ...]
    vocabulary: tuple[str, ...] = ()

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocabulary: Sequence[str] = ()) -> EntityPool:
        """The entities found in these texts, sorted so that a seed gives the same draws in every process."""
        found = {_split(word)[1] for text in texts for word in _entity_words(text.split())}
        return cls(entities=tuple(sorted(found)), vocabulary=tuple(vocabulary))


def _split(word: str) -> tuple[str, str, str]:
    """Leading punctuation, core, trailing punctuation."""
    match = WORD_PARTS.match(word)
    assert match is not None  # every string matches: all three groups may be empty
    return match.group(1), match.group(2), match.group(3)


def _is_entity(words: Sequence[str], index: int) -> bool:
    """A capitalised word that is not the first of the text or of a sentence (there capitals say nothing)."""
    core = _split(words[index])[1]
    return index > 0 and core[:1].isupper() and not words[index - 1].rstrip("\"')").endswith(SENTENCE_END)


def _entity_words(words: Sequence[str]) -> list[str]:
    return [word for index, word in enumerate(words) if _is_entity(words, index)]


def _other_number(core: str, rng: random.Random) -> str:
    """A different number of the same shape: every digit redrawn, separators kept, no new leading zero."""
    while True:
        digits = [rng.choice("123456789" if i == 0 and len(core) > 1 else "0123456789") if char.isdigit() else char
                  for i, char in enumerate(core)]
        if (candidate := "".join(digits)) != core:
            return candidate


def _swap(words: list[str], settings: NoiseSettings, rng: random.Random, pool: EntityPool) -> list[str]:
    """Entity and number swaps, judged on the original words (whether a word starts a sentence needs its neighbour)."""
    swapped = []
    for index, word in enumerate(words):
        lead, core, trail = _split(word)
        if NUMBER.fullmatch(core) and rng.random() < settings.number_swap:
            core = _other_number(core, rng)
        elif _is_entity(words, index) and rng.random() < settings.entity_swap:
            choices = [entity for entity in pool.entities if entity != core]
            core = rng.choice(choices) if choices else core
        swapped.append(lead + core + trail)
    return swapped


def noisy_text(text: str, settings: NoiseSettings, rng: random.Random, pool: EntityPool) -> str:
    """One noisy copy of `text`: swaps, then dropout, repeats, inserts and a local shuffle over the result.

    Dropout never removes the last word (word_dropout=1.0 leaves one word of the text), so a text with any words gives
    a non-empty copy; a blank text comes back as it is.
    """
    original = text.split()
    if not original:
        return text
    words = _swap(original, settings, rng, pool)
    kept = [word for word in words if rng.random() >= settings.word_dropout] or [rng.choice(words)]
    noisy: list[str] = []
    sources = pool.vocabulary or tuple(words)
    for word in kept:
        if rng.random() < settings.insert:
            noisy.append(rng.choice(sources))
        noisy.append(word)
        if rng.random() < settings.repeat:
            noisy.append(word)
    # Sort by position plus a jitter below SHUFFLE_WINDOW + 1: no word moves more than SHUFFLE_WINDOW places.
    keys = [index + (rng.random() * (SHUFFLE_WINDOW + 1) if rng.random() < settings.local_shuffle else 0.0)
            for index in range(len(noisy))]
    shuffled = [word for _, word in sorted(zip(keys, noisy, strict=True), key=lambda pair: pair[0])]
    # Unchanged words give the text back as it was, its own spacing and line breaks included.
    return text if shuffled == original else " ".join(shuffled)


def augment_texts(texts: list[str], settings: NoiseSettings, seed: int, *, vocabulary: Sequence[str] = ()) -> list[str]:
    """One noisy copy per text, the same for the same seed; entity swaps draw from capitalised words across `texts`."""
    pool = EntityPool.from_texts(texts, vocabulary)
    rng = random.Random(seed)
    return [noisy_text(text, settings, rng, pool) for text in texts]

