"""Embedding pooling (`ettin_jax.models.embedding`) against sentence-transformers' own Pooling
and Normalize modules, and the per-row dropout that the GradCache loss relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomized_model, small_config
from flax import nnx

from ettin_jax.models.embedding import (
    EMBEDDING_POOLINGS,
    EmbeddingConfig,
    check_embedding_pooling,
    embed,
    l2_normalize,
    pool_embeddings,
)

torch = pytest.importorskip("torch")


def _masks(rng: np.random.Generator, rows: int, seq: int) -> np.ndarray:
    """Right padding, left padding, a full row and a row without tokens."""
    mask = np.zeros((rows, seq), np.int64)
    for i in range(rows):
        length = int(rng.integers(1, seq + 1))
        if i % 3 == 1:  # left padding
            mask[i, seq - length:] = 1
        else:
            mask[i, :length] = 1
    mask[0] = 1
    mask[-1] = 0
    return mask


@pytest.mark.parametrize("pooling", EMBEDDING_POOLINGS)
def test_pooling_equals_sentence_transformers(pooling, rng):
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    rows, seq, hidden = 7, 11, 16
    states = rng.normal(size=(rows, seq, hidden)).astype(np.float32)
    mask = _masks(rng, rows, seq)
    theirs = Pooling(hidden, pooling_mode=pooling)(
        {"token_embeddings": torch.from_numpy(states),
         "attention_mask": torch.from_numpy(mask)})["sentence_embedding"]
    ours = pool_embeddings(jnp.asarray(states), jnp.asarray(mask), pooling)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6, atol=1e-6)
    normalized = Normalize()({"sentence_embedding": theirs})["sentence_embedding"]
    np.testing.assert_allclose(np.asarray(l2_normalize(ours)), normalized.numpy(),
                               rtol=1e-6, atol=1e-6)


def test_pooling_ignores_non_finite_padding(rng):
    states = rng.normal(size=(3, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1] * 6])
    clean = {p: pool_embeddings(jnp.asarray(states), jnp.asarray(mask), p)
             for p in EMBEDDING_POOLINGS}
    states[mask == 0] = np.nan
    for pooling, expected in clean.items():
        np.testing.assert_array_equal(
            pool_embeddings(jnp.asarray(states), jnp.asarray(mask), pooling), expected)


def test_members_and_config_are_checked():
    check_embedding_pooling("mlm", "cls")
    check_embedding_pooling("clm", "weightedmean")
    with pytest.raises(ValueError, match="'cls' is not supported by the decoder"):
        check_embedding_pooling("clm", "cls")
    with pytest.raises(ValueError, match="'lasttoken' is not supported by the encoder"):
        check_embedding_pooling("mlm", "lasttoken")
    with pytest.raises(ValueError, match="pooling must be one of"):
        EmbeddingConfig(pooling="max")
    with pytest.raises(ValueError, match="normalize must be a bool"):
        EmbeddingConfig(pooling="mean", normalize=1)
    assert EmbeddingConfig("lasttoken", True).normalize


@nnx.jit(static_argnames=("deterministic",))
def _embed(model, ids, mask, key, *, deterministic):
    return embed(model, ids, mask, "mean", deterministic=deterministic, dropout_rng=key)


def test_dropout_is_per_row(rng):
    """With dropout a row's embedding depends on its own key only (not on the other rows of
    the call): rows 2..4 embedded alone with their keys give what they give in the batch."""
    model = randomized_model(small_config(num_layers=2, attention_output_dropout=0.3), "mlm",
                             int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.integers(5, 1024, (6, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9) < rng.integers(1, 10, (6, 1)), jnp.int32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    full = _embed(model, ids, mask, key, deterministic=False)
    clean = _embed(model, ids, mask, None, deterministic=True)
    assert not np.allclose(full, clean, atol=1e-3)  # dropout is on
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(6))
    part = nnx.jit(lambda m, i, k_, r: embed(m, i, k_, "mean", deterministic=False, row_keys=r))(
        model, ids[2:5], mask[2:5], keys[2:5])
    np.testing.assert_allclose(part, full[2:5], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        embed(model, ids, mask, "mean", deterministic=False)
