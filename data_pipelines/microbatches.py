"""How a batch is made of microbatches, and batches of a varying number of them.

Layout (the one convention the train step and the data side share): in a batch of k
microbatches, row q * k + i belongs to microbatch i. With rows split over devices in contiguous
blocks, every microbatch is then spread over every device, so accumulating gradients over
microbatches keeps all devices busy. `split_microbatches` and `join_microbatches` are inverses.

`MicrobatchQueue` serves Ettin's batch-size warmup: the step after t real tokens takes k(t)
microbatches, k growing from 1 to the full batch. It cuts the pipeline's full batches (always
`global_batch_size` rows, the same rows for both members) into microbatches and hands out k at
a time, so no row is skipped or repeated; its state names the full batch being cut and how far,
so a restore continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

Array = TypeVar("Array")  # numpy or jax arrays: only .shape, .reshape and .swapaxes are used


def split_microbatches(batch: Mapping[str, Array], count: int) -> dict[str, Array]:
    """[rows, ...] arrays -> [count, rows / count, ...]: microbatch i is rows i, i + count, ...

    Raises ValueError when `count` does not divide the rows.
    """
    result = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % count:
            raise ValueError(f"{key}: {rows} rows do not split into {count} microbatches")
        result[key] = value.reshape(rows // count, count, *value.shape[1:]).swapaxes(0, 1)
    return result


def microbatch_rows(rows: int, microbatch_size: int | None,
                    max_microbatch_size: int | None = None) -> int | None:
    """Rows per microbatch of a batch of `rows` rows: None (the batch in one piece) without
    `microbatch_size`; else the largest multiple j x microbatch_size that divides `rows` and
    holds at most `max_microbatch_size` rows (None: microbatch_size itself), so the batch runs
    as the fewest whole microbatches that fit. Any split sums to the same gradient; this one
    only decides how many rows are in flight at once.

    Raises ValueError when microbatch_size does not divide `rows`.
    """
    if not microbatch_size:
        return None
    if rows % microbatch_size:
        raise ValueError(f"a batch of {rows} rows is not whole microbatches of "
                         f"{microbatch_size} rows")
    count = rows // microbatch_size
    most = max(1, (max_microbatch_size or microbatch_size) // microbatch_size)
    return microbatch_size * max(j for j in range(1, min(count, most) + 1) if count % j == 0)


def join_microbatches(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Microbatches (equal row counts) -> one batch in the layout `split_microbatches` undoes."""
    return {key: np.stack([part[key] for part in parts], axis=1)
            .reshape(-1, *parts[0][key].shape[1:]) for key in parts[0]}


class MicrobatchQueue:
    """Batches of whole microbatches, cut from an iterator of full batches.

    `batches` yields this process's rows of each full global batch (with get_state/set_state);
    a full batch holds `per_batch` microbatches, microbatch i being its rows i, i + per_batch,
    ... (local rows: each process's share of the global batch is a multiple of per_batch rows,
    which the caller guarantees by microbatch rows splitting over every device). `take(k)` joins
    the next k microbatches, crossing into the next full batch when needed; taking per_batch
    from the start of a full batch returns that batch unchanged.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], per_batch: int):
        self._batches = batches
        self.per_batch = per_batch
        self._current: dict[str, np.ndarray] | None = None  # the full batch being cut
        self._state_before: dict[str, Any] | None = None    # iterator state before it
        self._offset = 0                                     # microbatches already taken

    def take(self, count: int) -> dict[str, np.ndarray]:
        """The next `count` microbatches as one local batch (numpy), in the microbatch layout."""
        if self._current is None and count == self.per_batch:
            return next(self._batches)  # a whole batch, as the pipeline made it
        parts: list[dict[str, np.ndarray]] = []
        while len(parts) < count:
            if self._current is None:
                self._state_before = self._batches.get_state()
                self._current = next(self._batches)
                self._check_rows(self._current)
            end = min(self.per_batch, self._offset + count - len(parts))
            parts.extend({k: v[i::self.per_batch] for k, v in self._current.items()}
                         for i in range(self._offset, end))
            self._offset = end
            if self._offset == self.per_batch:
                self._current, self._state_before, self._offset = None, None, 0
        return join_microbatches(parts)

    def _check_rows(self, batch: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(batch.values())))
        if rows % self.per_batch:
            raise ValueError(f"{rows} local rows do not split into {self.per_batch} "
                             f"microbatches")

    def get_state(self) -> dict[str, Any]:
        """JSON-able: the iterator's state before the full batch being cut, and the
        microbatches taken from it (0 when none is being cut)."""
        if self._current is None:
            return {"iterator": self._batches.get_state(), "offset": 0}
        return {"iterator": self._state_before, "offset": self._offset}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues exactly where `get_state` was taken."""
        self._batches.set_state(state["iterator"])
        self._current, self._state_before, self._offset = None, None, 0
        if state["offset"]:
            self._state_before = state["iterator"]
            self._current = next(self._batches)
            self._offset = int(state["offset"])
