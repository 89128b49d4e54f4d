"""Batches sized in real tokens: the recipe keys (exclusive with rows), rows from the measured
packing fill, step counts through batch-size warmup, training at a token budget per step, and
every Ettin recipe taking Ettin's tokens per step and step counts in its dry run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.packing_fill import measure_packing_fill
from data_pipelines.tokenizers import load_tokenizer
from ettin_jax.cli import main
from ettin_jax.config import TrainConfig, load_recipe
from ettin_jax.errors import ConfigError
from ettin_jax.training.batch_sizing import (
    ASSUMED_PACKING_FILL,
    BatchSize,
    batch_size,
    estimated_steps,
)
from ettin_jax.training.evaluation import evaluate_run
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.schedules import batch_size_schedule
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ONE_PHASE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# Ettin's real tokens per optimizer step (its README: ~600k / ~100k / ~20k steps for
# 1.7T / 250B / 50B tokens of 4608 unpacked rows).
ETTIN_TOKENS_PER_STEP = {"pretrain": 1.7e12 / 600_000, "extension": 250e9 / 100_000,
                         "decay": 50e9 / 20_000, "main": 50e9 / 20_000}


def test_rows_and_tokens_are_exclusive_in_a_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  global_batch_size: 8\n  global_batch_tokens: 4096\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: train\.global_batch_tokens: "
                                          r"global_batch_size and global_batch_tokens are "
                                          r"exclusive"):
        load_recipe(path)
    # An override of one wins over the file's other; a phase setting one drops the inherited.
    recipe = load_recipe(RECIPES / "ettin-150m.yaml", ["train.global_batch_size=640"])
    assert (recipe.train.global_batch_size, recipe.train.global_batch_tokens) == (640, None)
    assert recipe.phases[0].train.global_batch_size == 640
    assert recipe.phases[1].train.global_batch_tokens == 2_500_000
    assert recipe.phases[1].train.global_batch_size is None
    rows = load_recipe(RECIPES / "tiny.yaml", ["train.global_batch_size=16",
                                               "phases.1.train.global_batch_tokens=3000"])
    assert (rows.train.global_batch_tokens, rows.phases[0].train.global_batch_size) == (None, 16)
    assert (rows.phases[1].train.global_batch_size,  # the phase sizes itself in tokens
            rows.phases[1].train.global_batch_tokens) == (None, 3000)
    with pytest.raises(ConfigError, match="both null"):
        load_recipe(None, ["train.global_batch_size=null"])


@pytest.mark.parametrize("fill", [0.55, 0.8, 0.97, 1.0])
def test_rows_hold_the_token_budget_to_half_a_microbatch(fill):
    train = TrainConfig(steps=10, global_batch_size=None, global_batch_tokens=100_000,
                        seq_len=512, microbatch_size=24)
    size = batch_size(train, packing_fill=fill)
    assert size.rows % 24 == 0 and size.rows >= 24 and size.fill_measured
    assert abs(size.tokens_per_step - 100_000) <= 12 * 512 * fill + 1
    rows_only = batch_size(dataclasses.replace(train, global_batch_size=48,
                                               global_batch_tokens=None), packing_fill=None)
    assert (rows_only.rows, rows_only.packing_fill, rows_only.fill_measured) == \
        (48, ASSUMED_PACKING_FILL, False)
    # Without microbatches the rows are whole multiples of the device count.
    unmicro = dataclasses.replace(train, microbatch_size=None)
    assert batch_size(unmicro, packing_fill=fill, row_multiple=8).rows % 8 == 0


@pytest.mark.parametrize("warmup", [0, 1, 10_000, 333_333, 5_000_000])
def test_estimated_steps_follow_the_batch_size_warmup(warmup, rng):
    train = TrainConfig(steps=None, tokens=int(rng.integers(200_000, 2_000_000)),
                        global_batch_size=96, seq_len=128, microbatch_size=8,
                        batch_warmup_tokens=warmup)
    size = BatchSize(96, float(rng.uniform(0.5, 1.0)), True, 128)
    # Step by step, as the trainer goes: each step takes the rows the schedule says.
    rows_after, tokens, steps = batch_size_schedule(train), 0.0, 0
    while tokens < train.tokens:
        tokens += rows_after(int(tokens)) * 128 * size.packing_fill
        steps += 1
    assert estimated_steps(train, size) == steps
    capped = dataclasses.replace(train, steps=7)
    assert estimated_steps(capped, size) == min(7, steps)


def test_packing_fill_is_measured_deterministically(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    data = DataConfig(sources=(SourceConfig("bundled", kind="bundled", split="heldout"),))
    fills = [measure_packing_fill(data, seq_len=128, seed=seed, tokenizer=tokenizer)
             for seed in (5, 5, 6)]
    assert fills[0] == fills[1]
    assert all(0.8 < f <= 1.0 for f in fills)


def test_training_takes_the_token_budget_per_step(tmp_path, tokenizer_dir):
    recipe = load_recipe(ONE_PHASE, [
        f"data.tokenizer={tokenizer_dir}", "train.steps=6", "train.seq_len=64",
        "train.global_batch_tokens=1000", "train.microbatch_size=8", "model.num_layers=2",
        "train.batch_warmup_tokens=1000", "logging.every_steps=1", "train.objectives=[clm]",
        "checkpoint.every_steps=100", "logging.eval_every_steps=6", "logging.eval_batches=1"])
    results = train_pair(recipe, tmp_path / "run")
    assert results["decoder"].step == 6
    logged = read_metrics(tmp_path / "run" / "decoder")
    rows = [int(r["batch_rows"]) for r in logged]
    full = batch_size(recipe.train, packing_fill=measure_packing_fill(
        recipe.data, seq_len=64, seed=21, tokenizer=load_tokenizer(tokenizer_dir))).rows
    assert full % 8 == 0 and full > 8
    # Batch-size warmup in tokens: one microbatch first, growing to the full batch.
    assert rows[0] == 8 and rows[-1] == full and rows == sorted(rows), rows
    # The full batches hold ~1000 real tokens: the measured fill sized them.
    per_step = np.diff([0] + [r["tokens"] for r in logged])
    assert all(abs(t - 1000) <= 4 * 64 + 64 for t, n in zip(per_step, rows) if n == full), \
        per_step
    # `ettin-jax eval` sizes the run's batches the same way: the trainer's held-out numbers.
    trained = [r for r in logged if "eval_loss" in r][-1]
    again = evaluate_run(tmp_path / "run")["decoder"]
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert again["eval_targets"] == trained["eval_targets"]


def test_data_seed_orders_the_documents_and_seed_draws_the_masks(tokenizer_dir):
    from data_pipelines.pipeline import make_batch_iterator

    tokenizer = load_tokenizer(tokenizer_dir)
    data = DataConfig(sources=(SourceConfig("bundled", kind="bundled", split="heldout"),),
                      mlm_masking="bernoulli")

    def batch(seed, data_seed):
        return next(make_batch_iterator(data, seq_len=64, global_batch_size=4, seed=seed,
                                        data_seed=data_seed, objective="mlm",
                                        tokenizer=tokenizer))

    base, other_masks, other_order = batch(1, 5), batch(2, 5), batch(1, 6)
    assert np.array_equal(base["segment_ids"], other_masks["segment_ids"])
    assert not np.array_equal(base["labels"], other_masks["labels"])
    originals = [np.where(b["labels"] >= 0, b["labels"], b["input_ids"]) for b in
                 (base, other_masks, other_order)]
    assert np.array_equal(originals[0], originals[1])  # the same rows, masked differently
    assert not np.array_equal(originals[0], originals[2])  # other documents
    assert np.array_equal(batch(5, None)["segment_ids"], base["segment_ids"])  # default: seed


def _plan(recipe: Path, capsys, *overrides: str) -> dict:
    assert main(["train", str(recipe), *overrides, "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("ettin-*.yaml")))
def test_ettin_recipes_take_ettins_tokens_per_step_and_steps(recipe, capsys):
    plan = _plan(RECIPES / recipe, capsys)
    for member in plan["members"].values():
        trains = [p["train"] for p in member["recipe"]["phases"]] or [member["recipe"]["train"]]
        for phase, train in zip(member["phases"], trains):
            ettin = ETTIN_TOKENS_PER_STEP[phase["name"]]
            assert abs(phase["tokens_per_step"] / ettin - 1) < 0.10, (recipe, phase)
            # The data is not prepared here: the figures are estimates and say so.
            assert phase["estimated"] and "assumed" in phase["estimate_note"]
            assert phase["global_batch_tokens"] is not None
            # Batch-size warmup (batches from one microbatch up) adds steps, at most as many
            # as one-microbatch steps over the warmup tokens.
            full_batch_steps = phase["tokens"] / phase["tokens_per_step"]
            micro_tokens = train["microbatch_size"] * phase["seq_len"] * phase["packing_fill"]
            warmup_steps = train["batch_warmup_tokens"] / micro_tokens
            assert full_batch_steps <= phase["steps"] <= full_batch_steps + warmup_steps + 1
    phases = {p["name"]: p for p in next(iter(plan["members"].values()))["phases"]}
    if "pretrain" in phases:  # Ettin: ~600k / ~100k / ~20k steps (1b: 250B -> 83.3B, 50B -> 16.7B)
        scale = 1 / 3 if recipe == "ettin-1b.yaml" else 1.0
        assert 560_000 <= phases["pretrain"]["steps"] <= 700_000
        assert math.isclose(phases["extension"]["steps"], 100_000 * scale, rel_tol=0.1)
        assert math.isclose(phases["decay"]["steps"], 20_000 * scale, rel_tol=0.1)


def test_dry_run_measures_the_fill_where_the_data_can_be_read(capsys, tokenizer_dir):
    # The bundled corpus is always readable: the fill is measured, nothing is estimated.
    plan = _plan(ONE_PHASE, capsys, f"data.tokenizer={tokenizer_dir}",
                 "train.global_batch_tokens=3000", "train.microbatch_size=4")
    (phase,) = plan["members"]["decoder"]["phases"]
    assert not phase["estimated"] and "estimate_note" not in phase
    assert 0.8 < phase["packing_fill"] <= 1.0
    assert phase["global_batch_size"] % 4 == 0 and phase["global_batch_tokens"] == 3000
    assert phase["tokens_per_step"] == round(phase["global_batch_size"] * phase["seq_len"]
                                             * phase["packing_fill"])
    assert abs(phase["tokens_per_step"] - 3000) <= 2 * 128
    # Data that is not there yet: the same plan, estimated at the assumed fill, and said so.
    missing = _plan(ONE_PHASE, capsys, f"data.tokenizer={tokenizer_dir}",
                    "train.global_batch_tokens=3000", "train.microbatch_size=4",
                    "data.sources=[{path: not-prepared-yet, kind: prepared}]")
    (guess,) = missing["members"]["decoder"]["phases"]
    assert guess["estimated"] and guess["packing_fill"] == ASSUMED_PACKING_FILL
    assert "cannot be read" in guess["estimate_note"]
