"""The train loop never waits for the device between logging steps: batches are made ahead on a
thread (also through batch-size warmup), the step computes its own learning rate, and metrics are
read only when the run looks at them; failures between looks are still caught."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ByteTokenizer

from data_pipelines.microbatches import MicrobatchQueue
from data_pipelines.pipeline import make_batch_iterator
from ettin_jax.config import load_recipe
from ettin_jax.config.schema import MeshConfig
from ettin_jax.training.batches import PhaseBatches
from ettin_jax.training.checkpoint import TrainCheckpointer
from ettin_jax.training.mesh import make_mesh
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.schedules import (
    add_tokens,
    batch_size_schedule,
    count_value,
    token_count,
    tokens_as_float32,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# Batch-size warmup from 2 rows to 8 over the first ~1500 tokens, logging every 4 steps.
WARMUP = ["train.seq_len=64", "train.global_batch_size=8", "model.num_layers=2",
          "train.microbatch_size=2", "train.batch_warmup_tokens=1500", "train.steps=9",
          "logging.every_steps=4", "checkpoint.every_steps=8"]


def _mesh():
    return make_mesh(MeshConfig(-1, 1), jax.devices()[:2])


@pytest.fixture
def guarded_reads(monkeypatch):
    """Makes the CPU enforce the device-to-host transfer guard as an accelerator does: a CPU
    array lives in host memory, so JAX lets every read through whatever the guard says. Every
    read of a jax.Array's value (int(), float(), np.asarray, jax.device_get) goes through
    `ArrayImpl._value`; under "disallow" or "disallow_explicit" in the reading thread it now
    raises like the accelerator's guard."""
    from jax._src import array, config

    unguarded = array.ArrayImpl._value

    def guarded(self):
        if config.transfer_guard_device_to_host.value in ("disallow", "disallow_explicit"):
            raise RuntimeError(f"Disallowed device-to-host transfer: {self.aval}")
        return unguarded.fget(self)

    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))


def test_steps_between_looks_transfer_nothing_but_the_batch(tmp_path, monkeypatch,
                                                            guarded_reads):
    """Under JAX's strictest transfer guards (explicit transfers too) in the loop's thread, a
    run through batch-size warmup completes: only the sanctioned looks (logging, checkpoints,
    the phase's end) and the batches (made on their own thread) move data. A hook that reads
    the device every step is caught by the same guards."""
    import ettin_jax.training.trainer as trainer

    recipe = load_recipe(TINY, WARMUP)
    with (jax.transfer_guard_device_to_host("disallow_explicit"),
          jax.transfer_guard_host_to_device("disallow_explicit")):
        result = trainer.train_member(recipe, "mlm", tmp_path / "encoder",
                                      tokenizer=ByteTokenizer(), mesh=_mesh())
    assert result.step == 9 and not result.stopped
    records = read_metrics(tmp_path / "encoder")
    assert [r["step"] for r in records] == [4, 8, 9]
    assert records[0]["batch_rows"] < records[-1]["batch_rows"] == 8  # warmup ran ahead too
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert TrainCheckpointer(tmp_path / "encoder", recipe.checkpoint).latest_step() == 9

    def stalling_progress(log, *, by_tokens):
        return lambda info: log.advance(int(info.state.step))  # reads the device

    monkeypatch.setattr(trainer, "advance_progress", stalling_progress)
    with (jax.transfer_guard_device_to_host("disallow_explicit"),
          pytest.raises(Exception, match="[Dd]isallowed.*transfer")):
        trainer.train_member(recipe, "mlm", tmp_path / "stalls", tokenizer=ByteTokenizer(),
                             mesh=_mesh())


def test_larger_microbatches_after_warmup_train_the_same_run(tmp_path, monkeypatch):
    """train.max_microbatch_size changes how many rows are in flight, not the run: through
    batch-size warmup (2, 4, 6 and 8 rows; 4 and 8 now run in pieces of 4 rows) the losses,
    gradient norms and rows equal those of microbatches of 2 rows (summed in another order).
    The encoder, with its sparse MLM head packed per microbatch (test_trainer covers the decoder
    under max_microbatch_size); the 2-row run is the first test's, its programs compiled once."""
    import ettin_jax.training.step as step_module
    from ettin_jax.training.trainer import train_member

    pieces = []  # (batch rows, microbatch rows) of every step traced
    unpatched = step_module.microbatch_rows

    def recorded(rows, size, most=None):
        pieces.append((rows, unpatched(rows, size, most)))
        return pieces[-1][1]

    monkeypatch.setattr(step_module, "microbatch_rows", recorded)
    runs, split = {}, {}
    for name, extra in [("small", []), ("large", ["train.max_microbatch_size=4"])]:
        recipe = load_recipe(TINY, [*WARMUP, "logging.every_steps=1", *extra])
        pieces.clear()
        train_member(recipe, "mlm", tmp_path / name, tokenizer=ByteTokenizer(), mesh=_mesh())
        runs[name], split[name] = read_metrics(tmp_path / name), dict(pieces)
    assert split == {"small": {2: 2, 4: 2, 6: 2, 8: 2}, "large": {2: 2, 4: 4, 6: 2, 8: 4}}
    small, large = runs["small"], runs["large"]
    assert [r["batch_rows"] for r in large] == [r["batch_rows"] for r in small]
    assert {2, 4, 6, 8} <= {r["batch_rows"] for r in small}
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in large], [r[key] for r in small], rtol=1e-5)


def test_failures_between_looks_stop_the_run_at_the_next_look(tmp_path, monkeypatch):
    """Every step overflows the MLM head's packing (capacity 1): the run looks at step 3 (its
    logging cadence), stops there naming step 1, and saves step 3."""
    import ettin_jax.training.losses as losses_module
    from ettin_jax.training.trainer import train_member

    recipe = load_recipe(TINY, ["train.seq_len=64", "train.global_batch_size=8",
                                "model.num_layers=2", "logging.every_steps=3"])
    monkeypatch.setattr(losses_module, "capacity_for", lambda *args: 1)
    result = train_member(recipe, "mlm", tmp_path / "encoder", tokenizer=ByteTokenizer(),
                          mesh=_mesh())
    assert result.failed and result.step == 3
    assert "of step 1 did not fit the MLM head's packing capacity" in result.stopped
    assert TrainCheckpointer(tmp_path / "encoder", recipe.checkpoint).latest_step() == 3


def test_phase_batches_follow_the_warmup_schedule_and_the_synchronous_cut(tmp_path):
    """The thread's batches equal cutting the pipeline's full batches by the batch-size
    schedule on the host, with the same token counts, data states and last flag; closing it
    midway stops its thread."""
    recipe = load_recipe(TINY, WARMUP + ["train.steps=12"])
    phase, train, mesh = recipe.run_phases()[0], recipe.train, _mesh()
    stream = make_batch_iterator(phase.data, seq_len=train.seq_len,
                                 global_batch_size=train.global_batch_size, seed=train.seed,
                                 data_seed=train.data_seed, objective="mlm",
                                 tokenizer=ByteTokenizer())
    cut = MicrobatchQueue(stream, train.global_batch_size // train.microbatch_size)
    rows_after = batch_size_schedule(train)
    tokens = 0
    with PhaseBatches(phase, 0, "mlm", ByteTokenizer(), mesh, phase_step=0, phase_tokens=0,
                      data_state=None, label="test") as batches:
        prepared = list(batches)
    assert len(prepared) == 12 and [b.last for b in prepared] == [False] * 11 + [True]
    for step, batch in enumerate(prepared, 1):
        rows = rows_after(tokens)
        expected = cut.take(rows // train.microbatch_size)
        tokens += int(np.count_nonzero(expected["segment_ids"]))
        assert (batch.rows, batch.phase_step, batch.phase_tokens) == (rows, step, tokens)
        assert batch.data_state == cut.get_state()
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(batch.arrays[key]), value)
    assert len({b.rows for b in prepared}) >= 3

    before = {t.ident for t in threading.enumerate()}
    batches = PhaseBatches(phase, 0, "mlm", ByteTokenizer(), mesh, phase_step=0,
                           phase_tokens=0, data_state=None, label="closed", depth=1)
    next(batches)
    batches.close()
    assert {t.ident for t in threading.enumerate() if t.name == "batches closed"} <= before


def test_the_device_token_count_is_exact_beyond_int32_and_rounds_like_the_host():
    rng = np.random.default_rng()
    start = int(rng.integers(2**31, 2**45))
    added = [int(n) for n in rng.integers(1, 2**30, size=50)]
    count = jax.numpy.asarray(token_count(start))
    step = jax.jit(add_tokens)
    for n in added:
        count = step(count, jax.numpy.int32(n))
    total = start + sum(added)
    assert count_value(count) == total
    assert float(jax.jit(tokens_as_float32)(count)) == float(np.float32(total))
    with pytest.raises(ValueError, match="negative"):
        token_count(-1)
