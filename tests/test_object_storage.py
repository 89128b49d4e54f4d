"""Run directories, prepared data, tokenizers and exports in object storage, against real
servers on loopback (tests/object_stores.py): fake-gcs-server for gs://, moto for s3://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from object_stores import BUCKET, GcsServer, S3Server, restore_environment, set_environment

from ettin_jax import storage
from ettin_jax.cli import main
from ettin_jax.config import load_recipe
from ettin_jax.hf.pretrained import from_pretrained
from ettin_jax.hf.transfer import export_checkpoint, import_pretrained
from ettin_jax.training.checkpoint import CHECKPOINTS, restore_weights
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# Small programs, a checkpoint every 2 steps, a record every step, TensorBoard on.
SMALL = ["train.seq_len=64", "model.num_layers=2", "logging.every_steps=1",
         "checkpoint.every_steps=2", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def servers():
    """Both servers, their variables set in this process for the module's tests."""
    with GcsServer() as gcs, S3Server() as s3:
        before = set_environment({**gcs.env, **s3.env})
        try:
            yield {"gs": gcs, "s3": s3}
        finally:
            restore_environment(before)


def _params(restored) -> dict:
    return nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))


def _assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = (dict(nnx.traversals.flatten_mapping(x)) for x in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_train_export_and_import_in_a_bucket(servers, scheme, tokenizer_dir, tmp_path):
    run = f"{scheme}://{BUCKET}/runs/{tmp_path.name}"
    recipe = load_recipe(RECIPE, [*SMALL, "train.steps=4", f"data.tokenizer={tokenizer_dir}",
                                  "train.objectives=[mlm]"])
    train_pair(recipe, run)
    encoder = storage.path(run) / "encoder"
    assert ocp.path.step.checkpoint_steps(encoder / CHECKPOINTS) == [2, 4]
    assert (storage.path(run) / "recipe.yaml").is_file()
    assert [r["step"] for r in read_metrics(encoder)] == [1, 2, 3, 4]
    assert list((encoder / "events").glob("events.out.tfevents.*"))
    assert load_recipe(storage.path(run) / "recipe.yaml") == recipe

    restored = restore_weights(encoder)
    assert restored.step == 4 and str(restored.tokenizer_dir).startswith(f"{scheme}://")
    # Export from the bucket into it, import back from it into the other store.
    report = export_checkpoint(run)["encoder"]
    assert str(report.path) == f"{run}/encoder/hf"
    assert (storage.path(report.path) / "model.safetensors").is_file()
    other = "s3" if scheme == "gs" else "gs"
    imported = import_pretrained(report.path, f"{other}://{BUCKET}/imported/{tmp_path.name}")
    _assert_same_params(_params(restore_weights(imported)), _params(restored))
    _assert_same_params(_params(from_pretrained(report.path)), _params(restored))
    # transformers reads a local download of the export.
    with storage.local_copy(report.path) as local:
        from transformers import AutoModelForMaskedLM

        assert AutoModelForMaskedLM.from_pretrained(local).config.num_hidden_layers == 2
