"""Shared test set-up: CPU JAX, small random models, and helpers."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import zlib  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from ettin_jax.models import EttinModel, ModelConfig, get_preset  # noqa: E402


def small_config(**overrides) -> ModelConfig:
    """The tiny preset with overrides: 128 wide, head_dim 64, vocab 1024."""
    return dataclasses.replace(get_preset("tiny"), **overrides)


def flat_params(model: EttinModel) -> dict[tuple, np.ndarray]:
    """{path tuple: numpy array} of every parameter."""
    return {
        tuple(path): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def randomized_model(config: ModelConfig, objective: str, seed: int) -> EttinModel:
    """A model whose norm scales and decoder bias are random too (init leaves them 1 and 0),
    so that a parity test would notice a misplaced norm or bias."""
    model = EttinModel(config, objective, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale" or path[0] == "decoder_bias":
            value = np.asarray(var.get_value())
            var.set_value(jnp.asarray(value + rng.normal(0.0, 0.2, value.shape), value.dtype))
    nnx.update(model, state)
    return model


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy generator seeded differently for every test (fresh seeds, reproducible by name)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@nnx.jit(static_argnames=("deterministic",))
def run_hidden(model, input_ids, segment_ids=None, positions=None, *, deterministic=True,
               dropout_rng=None):
    """model(...) under jit: one XLA compile is far cheaper on CPU than eager op-by-op dispatch."""
    return model(input_ids, segment_ids, positions, deterministic=deterministic,
                 dropout_rng=dropout_rng)


@nnx.jit
def run_logits(model, input_ids, segment_ids=None, positions=None):
    """model.logits(model(...)) under jit, evaluation mode."""
    return model.logits(model(input_ids, segment_ids, positions))
