"""The two views of one packed row: the encoder's masked tokens and the decoder's next tokens.

Both are pure functions of the packed rows (and, for MLM, of seed, step and global row index),
so the encoder and decoder of a pair see the same rows in the same order, and the masking does
not depend on how many threads or processes built the batch.

With "ettin" chunking (`data_pipelines.packing`) the rows hold the encoder's form of every chunk:
a chunk that is not a document's end closes with a forced [SEP]. `clm_labels` ignores the
target of such a [SEP] (given `forced_sep`), so the decoder learns [SEP] only at a document's
true end, as Ettin's decoders (whose chunks had no forced [SEP]) did.

MLM masking ("exact" or "bernoulli", `DataConfig.mlm_masking`): "bernoulli" is Ettin's
collator, transformers' DataCollatorForLanguageModeling: each eligible token (not padding, not
a special token) is selected with probability p; a selected token becomes [MASK] with
probability 0.8, else a random id of the whole vocabulary with probability 0.5 (0.1 overall),
else stays (transformers draws the [MASK] and random choices as two Bernoulli layers; one
uniform draw per selected token here gives the same distribution).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.special_tokens import SpecialTokens

IGNORE = -100  # label of positions without a loss
MASKINGS = ("exact", "bernoulli")


def clm_labels(input_ids: np.ndarray, segment_ids: np.ndarray,
               forced_sep: np.ndarray | None = None) -> np.ndarray:
    """Next-token targets [rows, seq]: the following token of the same document; IGNORE at a
    document's last token, before a document boundary, on padding and at the row's end, and,
    given `forced_sep` (1 where a [SEP] closes a chunk that is not a document's end), where the
    next token is such a [SEP]."""
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    same_document = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    if forced_sep is not None:
        same_document &= forced_sep[:, 1:] == 0
    labels[:, :-1] = np.where(same_document, input_ids[:, 1:], IGNORE)
    return labels


def mlm_inputs(
    input_ids: np.ndarray,
    segment_ids: np.ndarray,
    *,
    seed: int,
    step: int,
    rows: np.ndarray,
    mask_ratio: float,
    special: SpecialTokens,
    vocab_size: int,
    masking: str = "exact",
) -> dict[str, np.ndarray]:
    """Masked inputs and labels for the encoder.

    masking "exact": per row, exactly round(mask_ratio * eligible) positions are selected among
    eligible tokens (not padding, not a special token); of those 80% become [MASK], 10% a
    random non-special token, 10% stay. "bernoulli" (Ettin's collator): each eligible token is
    selected with probability mask_ratio; of those 80% [MASK], 10% a random id of the whole
    vocabulary [0, vocab_size), 10% stay. The randomness of row r at step s is drawn from
    (seed, s, rows[r]) alone.

    Returns input_ids (masked) and labels (original id where selected, IGNORE elsewhere). The
    sparse head finds the selected positions from the labels (`pallas_kernels.
    pack_masked_tokens`).
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    specials = np.array(sorted({i for i in special.as_dict().values() if i is not None}))
    masked = input_ids.astype(np.int32, copy=True)
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    eligible_rows = (segment_ids != 0) & ~np.isin(input_ids, specials)
    if masking == "bernoulli":
        for r in range(input_ids.shape[0]):
            rng = np.random.default_rng([seed, step, int(rows[r])])
            chosen = np.flatnonzero(eligible_rows[r] & (rng.random(input_ids.shape[1])
                                                        < mask_ratio))
            labels[r, chosen] = input_ids[r, chosen]
            kind = rng.random(len(chosen))
            to_mask, to_random = chosen[kind < 0.8], chosen[(kind >= 0.8) & (kind < 0.9)]
            masked[r, to_mask] = special.mask
            masked[r, to_random] = rng.integers(0, vocab_size, len(to_random))
        return {"input_ids": masked, "labels": labels}
    replacement_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), specials)
    for r in range(input_ids.shape[0]):
        rng = np.random.default_rng([seed, step, int(rows[r])])
        eligible = np.flatnonzero(eligible_rows[r])
        count = int(round(mask_ratio * len(eligible)))
        chosen = np.sort(rng.choice(eligible, size=count, replace=False))
        labels[r, chosen] = input_ids[r, chosen]
        kind = rng.random(count)
        to_mask, to_random = chosen[kind < 0.8], chosen[(kind >= 0.8) & (kind < 0.9)]
        masked[r, to_mask] = special.mask
        masked[r, to_random] = replacement_ids[rng.integers(0, len(replacement_ids),
                                                            len(to_random))]
    return {"input_ids": masked, "labels": labels}
