"""The two views of one packed row: the encoder's masked tokens and the decoder's next tokens.

Both are pure functions of the packed rows (and, for MLM, of seed, step and global row index),
so the encoder and decoder of a pair see the same rows in the same order, and the masking does
not depend on how many threads or processes built the batch.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.special_tokens import SpecialTokens

IGNORE = -100  # label of positions without a loss


def clm_labels(input_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Next-token targets [rows, seq]: the following token of the same document; IGNORE at a
    document's last token, before a document boundary, on padding and at the row's end."""
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    same_document = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
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
) -> dict[str, np.ndarray]:
    """Masked inputs and labels for the encoder.

    Per row, exactly round(mask_ratio * eligible) positions are selected among eligible tokens
    (not padding, not a special token); of those 80% become [MASK], 10% a random non-special
    token, 10% stay. The randomness of row r at step s is drawn from (seed, s, rows[r]) alone.

    Returns input_ids (masked) and labels (original id where selected, IGNORE elsewhere). The
    sparse head finds the selected positions from the labels (`pallas_kernels.
    pack_masked_tokens`).
    """
    specials = np.array(sorted({i for i in special.as_dict().values() if i is not None}))
    replacement_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), specials)
    masked = input_ids.astype(np.int32, copy=True)
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    eligible_rows = (segment_ids != 0) & ~np.isin(input_ids, specials)
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
