"""How full packed rows get on given data: the fraction of row slots holding real tokens.

A batch sized in real tokens (`train.global_batch_tokens`) needs this to know how many rows
hold that many tokens. It is measured on the data itself, the way training reads it, from a
fixed sample of rows, so the same data and seed always give the same figure.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.config import DataConfig
from data_pipelines.packing import packing_efficiency

SAMPLE_ROWS = 32     # rows per sample batch: independent packed streams
SAMPLE_BATCHES = 4   # batches of them: the first rows of a stream fill like the later ones


def measure_packing_fill(data: DataConfig, *, seq_len: int, seed: int, tokenizer) -> float:
    """Real tokens / row slots over SAMPLE_BATCHES batches of SAMPLE_ROWS packed rows of
    `data` at `seq_len` (documents in the order of data seed `seed`), in (0, 1].
    Deterministic for the same data, tokenizer and seed; the whole sample is built on every
    process (no process-dependent result)."""
    from data_pipelines.pipeline import make_batch_iterator

    batches = make_batch_iterator(data, seq_len=seq_len, global_batch_size=SAMPLE_ROWS,
                                  seed=seed, data_seed=seed, objective="clm",
                                  tokenizer=tokenizer)
    sample = np.concatenate([next(batches)["segment_ids"] for _ in range(SAMPLE_BATCHES)])
    return packing_efficiency(sample)
