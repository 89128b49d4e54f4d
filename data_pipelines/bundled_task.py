"""A classification task that needs no download: which genre of play (comedy, history, tragedy)
a short passage of Shakespeare comes from, built from the bundled corpus (data_pipelines/corpus).

34 plays in the First Folio's three genres (14 comedies, 10 histories, 10 tragedies; left
out: Cymbeline, a romance the Folio calls a tragedy, Troilus and Cressida, whose genre is
disputed, Pericles, which the Folio lacks, and the poems) are split BY PLAY: the 9 validation
plays (`DEV_PLAYS`: three per genre, the corpus's two held-out plays among them) give no
passage to training. A passage is a run of consecutive spoken lines (speaker names,
stage directions, act and scene headings dropped) of `MIN_CHARS` to `MAX_CHARS` characters,
newlines kept (verse against prose is part of the signal); each play gives passages evenly
spaced over its text, and every genre gets the same number of examples in each split, so the
majority-class rate is exactly 1/3. Built deterministically from the archive alone (no RNG, no
interpreter-dependent code files), so every machine builds the same examples.

Sizes: 1800 train (600 per genre) and 540 validation examples (180 per genre). A passage is at
most 200 characters: 120 tokens at most (median 83) with `make demo`'s 1024-piece tokenizer,
within max_length 128 with the specials. Difficulty: a TF-IDF bag of words with logistic
regression (scikit-learn, C=3) reaches 0.56 validation accuracy, against 1/3 by chance.
"""

from __future__ import annotations

import re
from functools import lru_cache

GENRES = ("comedy", "history", "tragedy")
PLAYS: dict[str, str] = {
    **dict.fromkeys((
        "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
        "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
        "midsummer_nights_dream", "much_ado_about_nothing", "taming_of_the_shrew", "tempest",
        "twelfth_night", "two_gentlemen_of_verona", "winters_tale"), "comedy"),
    **dict.fromkeys((
        "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"), "history"),
    **dict.fromkeys((
        "antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth",
        "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus"),
        "tragedy"),
}
# Fixed before any model saw the task: the corpus's held-out plays (macbeth, twelfth_night)
# plus two more per genre.
DEV_PLAYS = frozenset({
    "twelfth_night", "as_you_like_it", "comedy_of_errors",
    "henry_v", "richard_ii", "henry_vi_part_2",
    "macbeth", "othello", "julius_caesar",
})
SPLITS = ("train", "validation")
EXAMPLES_PER_GENRE = {"train": 600, "validation": 180}
MIN_CHARS, MAX_CHARS = 100, 200

_HEADING = re.compile(r"^(ACT|SCENE|Act|Scene)\b")
# A speaker's name on its own line: "Ber.", "THESEUS", "First Gentleman.", "KING HENRY."
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&-]*(?: [A-Za-z'&-]+){0,3}\.?$")


def genre_examples(split: str) -> list:
    """The examples of `split` ("train" or "validation"): `data_pipelines.task_data.Example`s
    with the passage as `text`, no pair, the genre's index in `GENRES` as `label`, and
    "shakespeare/<play>_gut.txt passage K (line L)" as `where`. Ordered by genre, then play,
    then position. Raises ValueError for another split."""
    if split not in SPLITS:
        raise ValueError(f"bundled-genre has no split {split!r}; valid: {', '.join(SPLITS)}")
    return list(_examples(split))


@lru_cache(maxsize=2)
def _examples(split: str) -> tuple:
    from data_pipelines.corpus import bundled_documents
    from data_pipelines.task_data import Example

    texts = {d.name: d.text for d in (*bundled_documents("train"), *bundled_documents("heldout"))
             if d.kind == "text"}
    examples = []
    for label, genre in enumerate(GENRES):
        plays = sorted(p for p, g in PLAYS.items()
                       if g == genre and (p in DEV_PLAYS) == (split == "validation"))
        quota, extra = divmod(EXAMPLES_PER_GENRE[split], len(plays))
        for index, play in enumerate(plays):
            name = f"shakespeare/{play}_gut.txt"
            passages = play_passages(texts[name])
            wanted = quota + (index < extra)
            if len(passages) < wanted:
                raise ValueError(f"{name}: {len(passages)} passages, {wanted} wanted")
            for k in evenly_spaced(len(passages), wanted):
                line, text = passages[k]
                examples.append(Example(text, None, label, f"{name} passage {k} (line {line})"))
    return tuple(examples)


def play_passages(text: str) -> list[tuple[int, str]]:
    """(first line number, passage) of every passage of a play's text, in order: runs of
    consecutive spoken lines from the first act heading on, cut greedily at line ends into
    pieces of MIN_CHARS..MAX_CHARS characters (a piece that cannot reach MIN_CHARS without
    passing MAX_CHARS is dropped)."""
    passages: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, line in _spoken_lines(text):
        length = sum(map(len, current)) + len(current) - 1
        if current and length + 1 + len(line) > MAX_CHARS:
            if length >= MIN_CHARS:
                passages.append((start, "\n".join(current)))
            current = []
        if not current:
            start = number
        current.append(line)
    if current and MIN_CHARS <= len("\n".join(current)) <= MAX_CHARS:
        passages.append((start, "\n".join(current)))
    return passages


def _spoken_lines(text: str):
    lines = text.splitlines()
    first_act = next((i for i, line in enumerate(lines) if _HEADING.match(line.strip())
                      and line.strip().upper().startswith("ACT")), 0)
    block_start = True
    in_direction = False
    for number, raw in enumerate(lines[first_act:], start=first_act + 1):
        line = raw.strip()
        if not line:
            block_start = True
            continue
        was_block_start, block_start = block_start, False
        if in_direction or line.startswith("["):
            in_direction = "]" not in line
            continue
        if _HEADING.match(line):
            continue
        if was_block_start and _SPEAKER.match(line):
            continue
        yield number, line


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """min(count, wanted) distinct indices spread evenly over range(count), ascending (the
    centres of `wanted` equal parts)."""
    if count <= wanted:
        return list(range(count))
    return [(2 * i + 1) * count // (2 * wanted) for i in range(wanted)]
