"""From a recipe's data section to batches for one member of the pair, on one process.

Row j of every global batch comes from its own packed stream: documents j, j + B, j + 2B, ... of
the shuffled mixture (B = global batch size). Hence:
- process i of P builds only its rows [i * B/P, (i + 1) * B/P), and the union over processes is
  exactly the single-process global batch;
- the iterator state is one small grain state per row, so a restore (also onto another process
  count) continues with bit-identical batches;
- encoder and decoder iterate the same rows in the same order; only `objectives` differs
  (with "ettin" chunking both pack the encoder's form of every chunk; the decoder's labels
  ignore the forced [SEP]s, see `packing`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import numpy as np

from data_pipelines.config import DataConfig
from data_pipelines.objectives import clm_labels, mlm_inputs
from data_pipelines.packing import FORCED_SEP, ChunkStats, packed_rows
from data_pipelines.sources import (
    TOKENIZER_COMMAND,
    MissingInputError,
    SourceStats,
    check_prepared,
    mixture,
    open_source,
    source_kind,
)
from ettin_jax import storage

OBJECTIVES = ("mlm", "clm")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a member's batches look like and which of them this process builds."""

    seq_len: int
    global_batch_size: int
    seed: int
    objective: str
    mask_ratio: float = 0.3
    process_index: int = 0
    process_count: int = 1
    mlm_masking: str = "exact"
    chunking: str = "bracketed"
    min_chunk_tokens: int = 512
    skip_chunk_tokens: int = 32
    data_seed: int | None = None  # document order and chunking (None: `seed`, which masks)

    @property
    def order_seed(self) -> int:
        """The seed of the document order and of chunk back-fills."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"the {self.process_count} processes")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is outside "
                             f"0..{self.process_count - 1}")

    @property
    def local_rows(self) -> np.ndarray:
        """Global row indices this process builds."""
        per_process = self.global_batch_size // self.process_count
        start = self.process_index * per_process
        return np.arange(start, start + per_process)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Endless batches (numpy, this process's rows) for one member; see the module docstring.

    Each batch has input_ids, segment_ids, positions, labels [rows, seq] (int32). `step` counts
    batches returned. `source_stats`: what reading each source fixed or skipped;
    `chunk_stats()`: what this process's rows drew from each source and what chunking dropped.
    """

    def __init__(self, documents: grain.MapDataset, spec: BatchSpec, *, tokenizer,
                 bins: int, workers: int = 0,
                 source_stats: dict[str, SourceStats] | None = None):
        self.spec = spec
        self.source_stats = source_stats or {}
        self.step = 0
        self._special = tokenizer.special_tokens
        self._vocab_size = tokenizer.vocab_size
        batch = spec.global_batch_size
        self._chunk_stats: list[dict[int, ChunkStats]] = []
        self._streams = {}
        for row in spec.local_rows:
            self._chunk_stats.append({})
            self._streams[int(row)] = iter(packed_rows(
                documents[int(row)::batch], seq_len=spec.seq_len, special=self._special,
                bins=bins, chunking=spec.chunking, min_chunk_tokens=spec.min_chunk_tokens,
                skip_chunk_tokens=spec.skip_chunk_tokens, seed=spec.order_seed,
                stats=self._chunk_stats[-1]))
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def __next__(self) -> dict[str, np.ndarray]:
        streams = list(self._streams.values())
        rows = list(self._pool.map(next, streams)) if self._pool else [next(s) for s in streams]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        forced_sep = batch.pop(FORCED_SEP, None)
        if self.spec.objective == "clm":
            batch["labels"] = clm_labels(batch["input_ids"], batch["segment_ids"], forced_sep)
        else:
            batch.update(mlm_inputs(
                batch["input_ids"], batch["segment_ids"], seed=self.spec.seed, step=self.step,
                rows=self.spec.local_rows, mask_ratio=self.spec.mask_ratio,
                special=self._special, vocab_size=self._vocab_size,
                masking=self.spec.mlm_masking,
            ))
        self.step += 1
        return batch

    def chunk_stats(self) -> dict[str, ChunkStats]:
        """{source: ChunkStats} summed over this process's rows, counted since this iterator
        was built (or restored): documents and tokens drawn (the packer reads a few documents
        ahead of the rows returned), chunks made, tokens "ettin" chunking dropped."""
        names = list(self.source_stats) or ["documents"]
        totals = {name: ChunkStats() for name in names}
        for per_row in self._chunk_stats:
            for index, stats in list(per_row.items()):
                totals[names[index] if index < len(names) else str(index)].add(stats)
        return totals

    def token_shares(self) -> dict[str, float]:
        """{source: share of the document tokens drawn so far} (see `chunk_stats`)."""
        stats = self.chunk_stats()
        total = sum(s.tokens for s in stats.values())
        return {name: s.tokens / total if total else 0.0 for name, s in stats.items()}

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the step and each local row's grain iterator state."""
        return {"step": self.step,
                "rows": {str(row): stream.get_state() for row, stream in self._streams.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly where `get_state` was taken (any process layout of the same
        global batch). Raises ValueError when `state` lacks one of this process's rows."""
        missing = [row for row in self._streams if str(row) not in state["rows"]]
        if missing:
            raise ValueError(f"iterator state has no entry for rows {missing[:5]}; was it saved "
                             f"with another global batch size?")
        for row, stream in self._streams.items():
            stream.set_state(state["rows"][str(row)])
        self.step = int(state["step"])


def load_data_tokenizer(data: DataConfig):
    """The tokenizer of `data`: data.tokenizer, else the one saved with prepared sources.

    Raises TokenizerError naming data.tokenizer when there is none.
    """
    from data_pipelines.prepare import TOKENIZER_DIR
    from data_pipelines.tokenizers import TokenizerError, load_tokenizer

    if data.tokenizer is not None:
        if not storage.path(data.tokenizer).exists():
            raise MissingInputError(
                f"data.tokenizer: {data.tokenizer} does not exist; train a tokenizer there with "
                f"`{TOKENIZER_COMMAND.format(path=data.tokenizer)}`", data.tokenizer)
        return load_tokenizer(data.tokenizer)
    for index, source in enumerate(data.sources):
        if source_kind(source) == "prepared":
            return load_tokenizer(check_prepared(source.path, f"data.sources.{index}")
                                  / TOKENIZER_DIR)
    raise TokenizerError(f"data.tokenizer is not set and no source is prepared: train a "
                         f"tokenizer with `{TOKENIZER_COMMAND.format(path='DIR')}` and set "
                         f"data.tokenizer=DIR")


def open_documents(data: DataConfig, tokenizer, *, seed: int) -> tuple[grain.MapDataset,
                                                                      dict[str, SourceStats]]:
    """The endless, shuffled mixture of data.sources as {"tokens", "source"} records (weights
    are token shares, see `sources.mixture`), and each source's stats, in source order (keyed
    by path; a path named twice gets its index appended)."""
    opened = [open_source(source, tokenizer) for source in data.sources]
    names: list[str] = []
    for index, o in enumerate(opened):
        names.append(o.source.path if o.source.path not in names else f"{o.source.path}#{index}")
    return mixture(opened, seed=seed), dict(zip(names, (o.stats for o in opened)))


def make_batch_iterator(
    data: DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    objective: str,
    tokenizer=None,
    mask_ratio: float | None = None,
    process_index: int = 0,
    process_count: int = 1,
    data_seed: int | None = None,
) -> BatchIterator:
    """Batches of `objective` ("mlm" or "clm") from `data` for this process. `seed` draws the
    MLM masks, `data_seed` (None: `seed`) the document order and chunking.

    The tokenizer defaults to `load_data_tokenizer(data)`, the mask ratio to
    data.mlm_mask_ratio (phases override it; held-out evaluation sets 0.15). Chunking and
    masking follow data.chunking, data.min_chunk_tokens, data.skip_chunk_tokens and
    data.mlm_masking.
    """
    tokenizer = tokenizer or load_data_tokenizer(data)
    spec = BatchSpec(seq_len, global_batch_size, seed, objective,
                     mask_ratio if mask_ratio is not None else data.mlm_mask_ratio,
                     process_index, process_count, mlm_masking=data.mlm_masking,
                     chunking=data.chunking, min_chunk_tokens=data.min_chunk_tokens,
                     skip_chunk_tokens=data.skip_chunk_tokens, data_seed=data_seed)
    documents, stats = open_documents(data, tokenizer, seed=spec.order_seed)
    return BatchIterator(documents, spec, tokenizer=tokenizer, bins=data.packing_bins,
                         workers=data.workers, source_stats=stats)
