"""Documents -> fixed-length rows: Ettin's [CLS] ... [SEP] chunks, packed first-fit.

A document longer than a row is split into chunks of at most seq_len - 2 tokens, each bracketed
[CLS] ... [SEP] (as Ettin's samples are); chunks are packed into rows by grain's first-fit packer.
Every row carries `segment_ids` (1..n per chunk, 0 = padding) and `positions` (0 at each chunk's
[CLS]). Nothing is lost or duplicated: every token of every document lands in exactly one row.
"""

from __future__ import annotations

import grain
import grain.experimental as gx
import numpy as np

from data_pipelines.special_tokens import SpecialTokens

# Chunks one document may yield; longer documents are already cut by the sources
# (MAX_DOCUMENT_CHARS), so this bounds the buffer, not the data.
_MAX_CHUNKS_PER_DOCUMENT = 1 << 16


class _BracketedChunks(gx.FlatMapTransform):
    """One token array -> chunks [CLS] + up to seq_len - 2 tokens + [SEP]."""

    max_fan_out = _MAX_CHUNKS_PER_DOCUMENT

    def __init__(self, seq_len: int, special: SpecialTokens):
        self._content = seq_len - 2
        self._cls = np.array([special.cls], np.int32)
        self._sep = np.array([special.sep], np.int32)

    def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        tokens = np.asarray(tokens, np.int32)
        return [
            {"tokens": np.concatenate([self._cls, tokens[start:start + self._content], self._sep])}
            for start in range(0, max(len(tokens), 1), self._content)
        ]


def packed_rows(
    documents: grain.MapDataset, *, seq_len: int, special: SpecialTokens, bins: int
) -> grain.IterDataset:
    """Rows {"input_ids", "segment_ids", "positions"} (int32 [seq_len]) from `documents`
    (a dataset of token arrays), in a deterministic order, in the calling thread."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 to hold [CLS] token [SEP], got {seq_len}")
    chunks = gx.FlatMapIterDataset(
        documents.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
        _BracketedChunks(seq_len, special),
    )
    packed = gx.FirstFitPackIterDataset(
        chunks, length_struct={"tokens": seq_len}, num_packing_bins=bins, shuffle_bins=False
    )
    return packed.map(_rename)


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": row["tokens"].astype(np.int32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
    }


def packing_efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of row slots holding real tokens (segment id != 0)."""
    return float(np.count_nonzero(segment_ids)) / max(segment_ids.size, 1)
