"""Microbatch layout, the queue behind batch-size warmup, and the batch-size schedule."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.microbatches import (MicrobatchQueue, join_microbatches, microbatch_rows,
                                         split_microbatches)
from ettin_jax.config.schema import TrainConfig
from ettin_jax.training.schedules import batch_size_schedule


class NumberedBatches:
    """Full batches of `rows` rows whose ids tell (batch, row); state = batches returned."""

    def __init__(self, rows: int, seq: int = 3):
        self.rows, self.seq, self.index = rows, seq, 0

    def __next__(self):
        ids = (self.index * 1000 + np.arange(self.rows))[:, None] * 10 + np.arange(self.seq)
        self.index += 1
        return {"input_ids": ids.astype(np.int32), "segment_ids": np.ones_like(ids, np.int32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def test_split_and_join_are_inverse(rng):
    batch = {"a": rng.integers(0, 100, (12, 5)), "b": rng.random((12, 3, 2))}
    split = split_microbatches(batch, 3)
    assert split["a"].shape == (3, 4, 5) and split["b"].shape == (3, 4, 3, 2)
    for i in range(3):  # microbatch i is rows i, i + 3, ...
        np.testing.assert_array_equal(split["a"][i], batch["a"][i::3])
    joined = join_microbatches([{k: v[i] for k, v in split.items()} for i in range(3)])
    for key in batch:
        np.testing.assert_array_equal(joined[key], batch[key])
    with pytest.raises(ValueError, match="12 rows do not split into 5 microbatches"):
        split_microbatches(batch, 5)


def _microbatch_ids(batch, count):
    """The first id of each row of each of the batch's `count` microbatches."""
    split = split_microbatches(batch, count)
    return [tuple(split["input_ids"][i][:, 0] // 10) for i in range(count)]


@pytest.mark.parametrize("rows, size, most, expected", [
    (12, None, None, None),  # no microbatches: one piece
    (12, 2, None, 2),        # no cap: microbatch_size
    (12, 2, 8, 6),           # 6 microbatches of 2 -> 2 of 6 (4 x 2 does not divide 12)
    (12, 2, 12, 12),         # the whole batch fits
    (14, 2, 12, 2),          # 7 microbatches, a prime: no merge fits
    (2880, 192, 960, 960),   # ettin-1b's phase 1: 15 x 192 -> 3 x 960
    (2880, 320, 2879, 960),  # 9 x 320: 3 x 960, not 4.5 x 320
    (8, 4, 5, 4),            # the cap below twice the size
])
def test_microbatch_rows_are_the_fewest_whole_microbatches_that_fit(rows, size, most, expected):
    assert microbatch_rows(rows, size, most) == expected
    if expected:
        assert rows % expected == 0 and expected % size == 0 and expected <= (most or size)


def test_microbatch_rows_refuse_a_batch_of_partial_microbatches():
    with pytest.raises(ValueError, match="a batch of 10 rows is not whole microbatches of 4"):
        microbatch_rows(10, 4, 8)


def test_queue_serves_every_microbatch_once_in_order_and_resumes_anywhere(rng):
    per_batch, rows = 4, 8
    expected = [tuple(b * 1000 + np.arange(i, rows, per_batch)) for b in range(10)
                for i in range(per_batch)]
    sizes = [int(k) for k in rng.integers(1, per_batch + 1, 12)]
    queue = MicrobatchQueue(NumberedBatches(rows), per_batch)
    served, states = [], []
    for k in sizes:
        states.append((len(served), queue.get_state()))
        served += _microbatch_ids(queue.take(k), k)
    assert served == expected[:len(served)]
    # A fresh queue restored from any state continues with identical batches.
    for index, (done, state) in enumerate(states):
        restored = MicrobatchQueue(NumberedBatches(rows), per_batch)
        restored.set_state(state)
        again = []
        for k in sizes[index:]:
            again += _microbatch_ids(restored.take(k), k)
        assert again == served[done:]


def test_a_whole_aligned_batch_is_the_pipeline_batch():
    queue = MicrobatchQueue(NumberedBatches(8), 4)
    first = queue.take(4)
    np.testing.assert_array_equal(first["input_ids"], next(NumberedBatches(8))["input_ids"])
    queue.take(1)
    crossing = queue.take(4)  # microbatches 1..3 of batch 1 and 0 of batch 2
    assert _microbatch_ids(crossing, 4)[-1] == (2000, 2004)
    assert queue.get_state() == {"iterator": {"index": 2}, "offset": 1}


def test_batch_size_schedule_grows_by_microbatches_to_the_full_batch():
    warm = batch_size_schedule(TrainConfig(global_batch_size=16, microbatch_size=4,
                                           batch_warmup_tokens=300))
    assert [warm(t) for t in (0, 99, 100, 199, 200, 299, 300, 10**12)] == \
        [4, 4, 8, 8, 12, 12, 16, 16]
    sizes = [warm(t) for t in range(0, 400, 7)]
    assert sizes == sorted(sizes)
    assert batch_size_schedule(TrainConfig(global_batch_size=16, microbatch_size=4))(0) == 16
