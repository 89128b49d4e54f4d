"""The datasets of the bundled lm-eval tasks (this folder's YAMLs): held-out Shakespeare, built
offline and deterministically (no RNG: distractors are picked by SHA-1 hashes of fixed
strings), so every machine builds the same examples.

The plays are the bundled corpus's held-out ones (`data_pipelines.corpus.HELDOUT_TEXT`:
Macbeth, Twelfth Night), never seen in pretraining. Lines are the plays' spoken lines as the
bundled genre task reads them (`data_pipelines.bundled_task`: speaker names, stage directions,
act and scene headings dropped). The held-out standard-library modules are left out: they
depend on the Python version that builds the task.

lm-eval loads this file by its path (`custom_dataset: !function bundled.next_line_dataset`) and
calls the function with the task's metadata as keyword arguments; they are ignored.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

CONTEXT_LINES = 3
CHOICES = 4
NEXT_LINE_EXAMPLES_PER_PLAY = 200
PERPLEXITY_PASSAGES_PER_PLAY = 50
# Shorter lines ("Ay.", "Exeunt.") say too little to be told apart.
MIN_LINE_CHARS = 20
# A distractor comes from at least this many spoken lines away from the example's lines.
MIN_DISTRACTOR_DISTANCE = 40


def heldout_plays() -> dict[str, str]:
    """Name -> text of the bundled corpus's held-out plays, in name order."""
    from data_pipelines.corpus import bundled_documents

    return {d.name: d.text for d in sorted(bundled_documents("heldout"), key=lambda d: d.name)
            if d.kind == "text"}


def next_line_examples() -> list[dict[str, Any]]:
    """The examples of `bundled_next_line`, play by play in line order: dicts with `context`
    (CONTEXT_LINES consecutive lines of one speech, joined by newlines), `choices` (CHOICES
    distinct lines), `label` (the index of the true next line in `choices`) and `where`
    ("shakespeare/<play>_gut.txt line N", N the true line's number in the file).

    Guarantees: every line is at least MIN_LINE_CHARS long; the distractors are lines of the
    same play at least MIN_DISTRACTOR_DISTANCE spoken lines from the example and differ from
    the answer, the context and each other; the labels cycle 0, 1, 2, 3 over the examples (each
    position holds the answer equally often: always picking one position scores 1/4)."""
    return [dict(e, choices=list(e["choices"])) for e in _next_line_examples()]


def perplexity_examples() -> list[dict[str, Any]]:
    """The documents of `bundled_perplexity`: dicts with `text` (a passage of spoken lines,
    100 to 200 characters, newlines kept; `data_pipelines.bundled_task.play_passages`) and
    `where` ("shakespeare/<play>_gut.txt line N"), PERPLEXITY_PASSAGES_PER_PLAY passages per
    play evenly spaced over it."""
    return [dict(e) for e in _perplexity_examples()]


def next_line_dataset(**metadata: Any):
    """`bundled_next_line`'s data as lm-eval's custom_dataset: a datasets.DatasetDict whose
    one split, "test", holds `next_line_examples()`."""
    return _dataset(next_line_examples())


def perplexity_dataset(**metadata: Any):
    """`bundled_perplexity`'s data as lm-eval's custom_dataset: a datasets.DatasetDict whose
    one split, "test", holds `perplexity_examples()`."""
    return _dataset(perplexity_examples())


def _dataset(rows: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


@lru_cache(maxsize=1)
def _next_line_examples() -> tuple[dict[str, Any], ...]:
    # bundled_task's line reader is the corpus's one reading of a play's spoken lines.
    from data_pipelines.bundled_task import _spoken_lines, evenly_spaced

    examples = []
    for name, text in heldout_plays().items():
        lines = list(_spoken_lines(text))
        # Windows of CONTEXT_LINES + 1 lines that follow each other in the file (one speech).
        starts = [i for i in range(len(lines) - CONTEXT_LINES)
                  if lines[i + CONTEXT_LINES][0] - lines[i][0] == CONTEXT_LINES
                  and all(len(line) >= MIN_LINE_CHARS
                          for _, line in lines[i:i + CONTEXT_LINES + 1])]
        if len(starts) < NEXT_LINE_EXAMPLES_PER_PLAY:
            raise ValueError(f"{name}: {len(starts)} windows of {CONTEXT_LINES + 1} lines, "
                             f"{NEXT_LINE_EXAMPLES_PER_PLAY} wanted")
        pool = [i for i, (_, line) in enumerate(lines) if len(line) >= MIN_LINE_CHARS]
        for k in evenly_spaced(len(starts), NEXT_LINE_EXAMPLES_PER_PLAY):
            start = starts[k]
            window = [line for _, line in lines[start:start + CONTEXT_LINES + 1]]
            answer_number, answer = lines[start + CONTEXT_LINES]
            where = f"{name} line {answer_number}"
            distractors: list[str] = []
            attempt = 0
            while len(distractors) < CHOICES - 1:
                index = pool[_hash(f"{where} distractor {attempt}") % len(pool)]
                attempt += 1
                line = lines[index][1]
                far = (index < start - MIN_DISTRACTOR_DISTANCE
                       or index > start + CONTEXT_LINES + MIN_DISTRACTOR_DISTANCE)
                if far and line not in window and line not in distractors:
                    distractors.append(line)
            label = len(examples) % CHOICES
            choices = distractors[:label] + [answer] + distractors[label:]
            examples.append({"context": "\n".join(window[:-1]), "choices": tuple(choices),
                             "label": label, "where": where})
    return tuple(examples)


@lru_cache(maxsize=1)
def _perplexity_examples() -> tuple[dict[str, Any], ...]:
    from data_pipelines.bundled_task import evenly_spaced, play_passages

    examples = []
    for name, text in heldout_plays().items():
        passages = play_passages(text)
        for k in evenly_spaced(len(passages), PERPLEXITY_PASSAGES_PER_PLAY):
            line, passage = passages[k]
            examples.append({"text": passage, "where": f"{name} line {line}"})
    return tuple(examples)


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)
