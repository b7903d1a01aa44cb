"""Noise augmentation: each operation alone on a fixed text, settings checks, and whole runs over real AG News rows."""

from __future__ import annotations

import random
import re

import pytest

from budgetlora.augment import SHUFFLE_WINDOW, EntityPool, NoiseSettings, augment_texts, noisy_text

# Entities: Google, Monday, Reuters. Not entities: "Shares" (first word) and "The" (starts a sentence).
TEXT = "Shares of Google rose 15% to $1,200 on Monday, said Reuters. The deal closes in 2005."
WORDS = TEXT.split()
NUMBER_INDICES = [4, 6, 15]  # "15%", "$1,200", "2005."
ENTITY_INDICES = [2, 8, 10]  # "Google", "Monday,", "Reuters."
POOL = EntityPool(entities=("Alpha", "Beta", "Google"))
OFF = NoiseSettings(**dict.fromkeys(("word_dropout", "local_shuffle", "repeat", "insert", "entity_swap",
                                     "number_swap"), 0.0))


def only(**probabilities: float) -> NoiseSettings:
    """Every operation off except the ones given."""
    return NoiseSettings(**{**OFF.__dict__, **probabilities})


def run(settings: NoiseSettings, seed: int = 0, text: str = TEXT, pool: EntityPool = POOL) -> list[str]:
    return noisy_text(text, settings, random.Random(seed), pool).split()


def test_all_zero_settings_give_the_text_back_exactly(news_rows: list[tuple[str, int]]) -> None:
    texts = [text for text, _ in news_rows] + ["two  spaces\nand a line break", "   "]
    assert augment_texts(texts, OFF, seed=0) == texts


def test_same_seed_same_copies_and_other_seeds_differ(news_rows: list[tuple[str, int]]) -> None:
    texts = [text for text, _ in news_rows]
    first = augment_texts(texts, NoiseSettings(), seed=7)
    assert first == augment_texts(texts, NoiseSettings(), seed=7)
    other = augment_texts(texts, NoiseSettings(), seed=8)
    assert sum(a != b for a, b in zip(first, other, strict=True)) > len(texts) // 2
    assert sum(a != b for a, b in zip(first, texts, strict=True)) > len(texts) // 2


@pytest.mark.parametrize("settings", [NoiseSettings(), NoiseSettings(*[1.0] * 6), only(word_dropout=1.0)])
def test_never_empty_on_real_news(news_rows: list[tuple[str, int]], settings: NoiseSettings) -> None:
    texts = [text for text, _ in news_rows]
    for seed in range(3):
        assert all(copy.strip() for copy in augment_texts(texts, settings, seed=seed))


def test_word_dropout_keeps_order_and_at_least_one_word() -> None:
    for seed in range(20):
        single = run(only(word_dropout=1.0), seed)
        assert len(single) == 1 and single[0] in WORDS
        kept = iter(WORDS)
        half = run(only(word_dropout=0.5), seed)
        assert half and all(word in kept for word in half)  # an in-order subsequence of the text's words
    assert sum(len(run(only(word_dropout=0.5), seed)) for seed in range(20)) < 0.75 * 20 * len(WORDS)


def test_number_swap_changes_every_number_and_nothing_else() -> None:
    for seed in range(20):
        swapped = run(only(number_swap=1.0), seed)
        assert len(swapped) == len(WORDS)
        for index, (before, after) in enumerate(zip(WORDS, swapped, strict=True)):
            if index in NUMBER_INDICES:
                assert after != before
                # Same shape: digits where digits were, "%", "$", "," and "." where they were, no new leading zero.
                assert re.sub(r"\d", "9", after) == re.sub(r"\d", "9", before)
                assert not re.search(r"(?<![\d,])0\d", after)
            else:
                assert after == before


def test_entity_swap_draws_from_the_pool_and_keeps_punctuation() -> None:
    for seed in range(10):
        swapped = run(only(entity_swap=1.0), seed)
        for index, (before, after) in enumerate(zip(WORDS, swapped, strict=True)):
            if index in ENTITY_INDICES:
                core = before.rstrip(",.")
                assert after != before and after.rstrip(",.") in POOL.entities  # never "Google" for "Google"
                assert after[len(after.rstrip(",.")):] == before[len(core):]
            else:
                assert after == before
    # A pool holding nothing but the word itself leaves it be.
    assert run(only(entity_swap=1.0), text="Shares of Google rose", pool=EntityPool(("Google",))) == WORDS[:4]


def test_repeat_and_insert() -> None:
    assert run(only(repeat=1.0)) == [word for word in WORDS for _ in range(2)]
    inserted = run(only(insert=1.0))
    assert inserted[1::2] == WORDS and all(word in WORDS for word in inserted[::2])
    vocabulary = ("zebra", "quartz")
    from_vocabulary = run(only(insert=1.0), pool=EntityPool(POOL.entities, vocabulary))
    assert from_vocabulary[1::2] == WORDS and set(from_vocabulary[::2]) <= set(vocabulary)
    assert len(set(augment_texts([TEXT], only(insert=1.0), seed=0, vocabulary=vocabulary)[0].split()) - set(WORDS)) > 0


def test_local_shuffle_moves_words_at_most_the_window() -> None:
    text = " ".join(f"w{index}" for index in range(40))
    for seed in range(20):
        shuffled = run(only(local_shuffle=1.0), seed, text=text)
        assert sorted(shuffled) == sorted(text.split()) and shuffled != text.split()
        assert max(abs(position - int(word[1:])) for position, word in enumerate(shuffled)) <= SHUFFLE_WINDOW


def test_entity_pool_from_texts() -> None:
    pool = EntityPool.from_texts([TEXT, "Microsoft (Nasdaq) slipped.", "Apple beat IBM!"], vocabulary=["x"])
    assert pool.entities == ("Google", "IBM", "Monday", "Nasdaq", "Reuters")
    assert pool.vocabulary == ("x",)


def test_blank_text_comes_back_as_it_is() -> None:
    assert noisy_text("  \n", NoiseSettings(*[1.0] * 6), random.Random(0), POOL) == "  \n"


@pytest.mark.parametrize("field", list(OFF.__dict__))
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_invalid_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"NoiseSettings\.{field} must be a probability"):
        NoiseSettings(**{field: value})
