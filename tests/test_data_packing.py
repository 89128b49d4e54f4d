"""Packing loses and duplicates nothing; the MLM and CLM views follow Ettin's rules exactly."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from data_pipelines.objectives import IGNORE, clm_labels, mlm_inputs
from data_pipelines.packing import packed_rows, packing_efficiency
from data_pipelines.special_tokens import PROJECT

VOCAB = 300


def _random_documents(rng, count, seq_len):
    lengths = rng.choice([1, 2, seq_len - 3, seq_len - 2, seq_len - 1, 3 * seq_len + 5,
                          *rng.integers(1, 2 * seq_len, 10)], size=count)
    return [rng.integers(5, VOCAB, n).astype(np.int32) for n in lengths]


def _chunks_of_rows(rows):
    """Every (segment content) of the packed rows, checking the row invariants on the way."""
    found = []
    for row in rows:
        ids, segments, positions = row["input_ids"], row["segment_ids"], row["positions"]
        assert ids.dtype == segments.dtype == positions.dtype == np.int32
        real = segments > 0
        assert not np.any(real[np.argmin(real):]) or real.all()  # padding only at the end
        assert np.all(ids[~real] == 0)
        n = segments.max()
        assert sorted(set(segments[real].tolist())) == list(range(1, n + 1))
        for s in range(1, n + 1):
            where = np.flatnonzero(segments == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            chunk = ids[where]
            assert chunk[0] == PROJECT.cls and chunk[-1] == PROJECT.sep
            found.append(tuple(chunk[1:-1].tolist()))
    return found


@pytest.mark.parametrize("seq_len", [16, 37])
def test_no_token_lost_or_duplicated_over_an_epoch(seq_len, rng):
    documents = _random_documents(rng, 60, seq_len)
    rows = list(packed_rows(grain.MapDataset.source(documents), seq_len=seq_len,
                            special=PROJECT, bins=3))
    content = seq_len - 2
    expected = [tuple(d[i:i + content].tolist()) for d in documents
                for i in range(0, len(d), content)]
    assert sorted(_chunks_of_rows(rows)) == sorted(expected)
    efficiency = packing_efficiency(np.stack([r["segment_ids"] for r in rows]))
    assert 0.5 < efficiency <= 1.0


def test_clm_labels_never_cross_a_document(rng):
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    ids = rng.integers(5, VOCAB, segments.shape).astype(np.int32)
    labels = clm_labels(ids, segments)
    for r in range(2):
        for t in range(8):
            same = t + 1 < 8 and segments[r, t] != 0 and segments[r, t + 1] == segments[r, t]
            assert labels[r, t] == (ids[r, t + 1] if same else IGNORE)


def _packed_batch(rng, rows=6, seq_len=64):
    ids = rng.integers(5, VOCAB, (rows, seq_len)).astype(np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(2, seq_len), 3, replace=False))
        segments[r, :cuts[0]], segments[r, cuts[0]:cuts[1]], segments[r, cuts[1]:cuts[2]] = 1, 2, 3
        for start in (0, cuts[0], cuts[1]):
            ids[r, start] = PROJECT.cls
        ids[r, cuts[:3] - 1] = PROJECT.sep
    ids[segments == 0] = PROJECT.pad
    return ids, segments


def test_mlm_selects_only_real_tokens_with_80_10_10(rng):
    ids, segments = _packed_batch(rng, rows=64, seq_len=128)
    seed, step = int(rng.integers(1 << 30)), int(rng.integers(1000))
    out = mlm_inputs(ids, segments, seed=seed, step=step, rows=np.arange(64), mask_ratio=0.3,
                     special=PROJECT, vocab_size=VOCAB)
    selected = out["labels"] != IGNORE
    eligible = (segments != 0) & (ids >= 5)
    assert not np.any(selected & ~eligible)  # specials and padding are never selected
    np.testing.assert_array_equal(out["labels"][selected], ids[selected])
    np.testing.assert_array_equal(selected.sum(1), np.round(0.3 * eligible.sum(1)))
    np.testing.assert_array_equal(out["input_ids"][~selected], ids[~selected])
    masked = out["input_ids"][selected] == PROJECT.mask
    kept = out["input_ids"][selected] == ids[selected]
    replaced = ~masked & ~kept
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.03 and abs(replaced.sum() / n - 0.1) < 0.03
    assert np.all(out["input_ids"][selected][replaced] >= 5)  # random tokens are not special
    assert sorted(out) == ["input_ids", "labels"]


def test_mlm_randomness_is_a_function_of_seed_step_and_row(rng):
    ids, segments = _packed_batch(rng)
    seed = int(rng.integers(1 << 30))

    def run(step, rows):
        return mlm_inputs(ids, segments, seed=seed, step=step, rows=rows, mask_ratio=0.3,
                          special=PROJECT, vocab_size=VOCAB)

    base = run(3, np.arange(6))
    again = run(3, np.arange(6))
    for key in base:
        np.testing.assert_array_equal(base[key], again[key])
    # Rows are independent: computing rows 2..5 alone gives the same masks for them.
    part = mlm_inputs(ids[2:], segments[2:], seed=seed, step=3, rows=np.arange(2, 6),
                      mask_ratio=0.3, special=PROJECT, vocab_size=VOCAB)
    np.testing.assert_array_equal(part["labels"], base["labels"][2:])
    assert not np.array_equal(run(4, np.arange(6))["labels"], base["labels"])
