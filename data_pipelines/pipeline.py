"""From a recipe's data section to batches for one member of the pair, on one process.

Row j of every global batch comes from its own packed stream: documents j, j + B, j + 2B, ... of
the shuffled mixture (B = global batch size). Hence:
- process i of P builds only its rows [i * B/P, (i + 1) * B/P), and the union over processes is
  exactly the single-process global batch;
- the iterator state is one small grain state per row, so a restore (also onto another process
  count) continues with bit-identical batches;
- encoder and decoder iterate the same rows in the same order; only `objectives` differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data_pipelines.config import DataConfig
from data_pipelines.objectives import clm_labels, mlm_inputs
from data_pipelines.packing import packed_rows
from data_pipelines.sources import (
    TOKENIZER_COMMAND,
    MissingInputError,
    SourceStats,
    check_prepared,
    mixture,
    open_source,
    source_kind,
)

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
    batches returned.
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
        self._streams = {
            int(row): iter(packed_rows(documents[int(row)::batch], seq_len=spec.seq_len,
                                       special=self._special, bins=bins))
            for row in spec.local_rows
        }
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def __next__(self) -> dict[str, np.ndarray]:
        streams = list(self._streams.values())
        rows = list(self._pool.map(next, streams)) if self._pool else [next(s) for s in streams]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        if self.spec.objective == "clm":
            batch["labels"] = clm_labels(batch["input_ids"], batch["segment_ids"])
        else:
            batch.update(mlm_inputs(
                batch["input_ids"], batch["segment_ids"], seed=self.spec.seed, step=self.step,
                rows=self.spec.local_rows, mask_ratio=self.spec.mask_ratio,
                special=self._special, vocab_size=self._vocab_size,
            ))
        self.step += 1
        return batch

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
        if not Path(data.tokenizer).exists():
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
    """The endless, shuffled mixture of data.sources as token arrays, and each source's stats."""
    opened = [open_source(source, tokenizer) for source in data.sources]
    return mixture(opened, seed=seed), {o.source.path: o.stats for o in opened}


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
) -> BatchIterator:
    """Batches of `objective` ("mlm" or "clm") from `data` for this process.

    The tokenizer defaults to `load_data_tokenizer(data)`, the mask ratio to
    data.mlm_mask_ratio (phases override it).
    """
    tokenizer = tokenizer or load_data_tokenizer(data)
    spec = BatchSpec(seq_len, global_batch_size, seed, objective,
                     mask_ratio if mask_ratio is not None else data.mlm_mask_ratio,
                     process_index, process_count)
    documents, stats = open_documents(data, tokenizer, seed=seed)
    return BatchIterator(documents, spec, tokenizer=tokenizer, bins=data.packing_bins,
                         workers=data.workers, source_stats=stats)
