"""The chunked vocabulary projection + cross-entropy (`losses.chunked_head_sums`) against the
dense computation on all positions and against optax's one-hot softmax cross-entropy: values
and gradients, precisions "uniform" and "autocast"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import randomized_model, small_config
from flax import nnx

from ettin_jax.training.losses import chunked_head_sums, cross_entropy_sums

ROWS, SEQ = 3, 37  # 111 positions: chunks of 16 leave a ragged last chunk (padding)


def _inputs(rng, config):
    hidden = jnp.asarray(rng.normal(0.0, 1.0, (ROWS, SEQ, config.hidden_size)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, config.vocab_size, (ROWS, SEQ)), jnp.int32)
    weights = jnp.asarray(rng.random((ROWS, SEQ)) < 0.7)
    return hidden, labels, weights


def _optax_sums(logits, labels, weights):
    """An independent reference: optax's one-hot softmax cross-entropy in fp32."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    w = weights.astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * w), "targets": jnp.sum(w),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * w)}


@pytest.mark.parametrize("precision, dtype", [("uniform", jnp.float32),
                                              ("autocast", jnp.bfloat16),
                                              ("uniform", jnp.bfloat16)])
def test_chunked_head_equals_the_dense_loss_and_its_gradients(rng, precision, dtype):
    config = small_config(precision=precision, dtype=dtype)
    model = randomized_model(config, "clm", int(rng.integers(1 << 30)))
    graph, params = nnx.split(model)
    hidden, labels, weights = _inputs(rng, config)

    def loss(head, params, hidden):
        sums = head(nnx.merge(graph, params), hidden)
        return sums["loss_sum"], sums

    chunked = lambda m, h: chunked_head_sums(m, h, labels, weights, chunk_positions=16)  # noqa
    dense = lambda m, h: cross_entropy_sums(m.logits(h), labels, weights)  # noqa
    reference = lambda m, h: _optax_sums(m.logits(h), labels, weights)  # noqa
    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    (g_chunk, h_chunk), s_chunk = grad(chunked, params, hidden)
    (g_dense, h_dense), s_dense = grad(dense, params, hidden)
    _, s_ref = grad(reference, params, hidden)

    assert float(s_chunk["targets"]) == float(np.sum(weights))
    # fp32 sums in another order; bf16 logits ("uniform" bf16) round the same way per position.
    np.testing.assert_allclose(s_chunk["loss_sum"], s_dense["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(s_chunk["loss_sum"], s_ref["loss_sum"], rtol=1e-5)
    assert abs(float(s_chunk["correct"]) - float(s_dense["correct"])) <= 1  # argmax ties
    # Relative to each gradient's largest entry: bf16 rounding of the head's backward differs
    # by fusion (and per chunk) between the two programs; under "uniform" bf16 the dense
    # program sums the bf16 decoder-bias gradient over all 111 positions in bf16, the chunked
    # one over chunks in fp32 (up to ~5% of the largest entry apart).
    tol = {jnp.float32: 1e-5}.get(dtype, 2e-2 if precision == "autocast" else 6e-2)
    flat_chunk, flat_dense = jax.tree.leaves(g_chunk), jax.tree.leaves(g_dense)
    assert any(np.abs(np.asarray(g, np.float32)).max() > 0 for g in flat_chunk)
    for a, b in zip([h_chunk, *flat_chunk], [h_dense, *flat_dense]):
        assert a.dtype == b.dtype
        scale = np.abs(np.asarray(b, np.float32)).max() + 1e-12
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, atol=tol)


def test_one_chunk_is_the_dense_computation(rng):
    config = small_config()
    model = randomized_model(config, "clm", int(rng.integers(1 << 30)))
    hidden, labels, weights = _inputs(rng, config)
    whole = chunked_head_sums(model, hidden, labels, weights)  # 111 positions: one chunk
    dense = cross_entropy_sums(model.logits(hidden), labels, weights)
    for key in dense:
        assert float(whole[key]) == float(dense[key])
