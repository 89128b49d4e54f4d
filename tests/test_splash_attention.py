"""JAX's splash attention behind our mask semantics (pallas_kernels/splash.py) against the XLA
reference, in splash's TPU interpret mode on CPU: forward and the three gradients for global,
causal, local (the encoder's (w, w), the decoder's (w - 1, 0), an asymmetric window) and packed
segments with padding, at lengths that are not a multiple of splash's blocks. Every case runs
in interpret mode; the Mosaic compilation for a TPU is in test_tpu_aot.py."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import (
    check_against_reference,
    random_inputs,
    random_segments,
)

from pallas_kernels.splash import block_size, splash_attention

MASKS = [(False, None), (True, None), (False, (16, 16)), (True, (15, 0)), (False, (5, 9))]


def _check(q, k, v, segments, *, rng, **kwargs):
    """Forward and all three gradients (random cotangent) of splash against the reference."""
    check_against_reference(q, k, v, segments, rng=rng, attention=splash_attention, **kwargs)


@pytest.mark.parametrize("causal, window", MASKS)
def test_matches_the_xla_reference(rng, causal, window):
    """Packed documents (one of one token), tail padding and an all-padding row, S padded to
    two 128-row blocks."""
    seq = int(rng.integers(140, 250))
    q, k, v = random_inputs(rng, 3, seq, 2, 64)
    segments = jnp.asarray(random_segments(rng, 3, seq))
    _check(q, k, v, segments, causal=causal, window=window, rng=rng, block=128)


def test_bf16_head_dim_128_one_document(rng):
    """bf16 inputs (q scaled in bf16 before the kernel), no segment ids, default blocks."""
    seq = int(rng.integers(20, 120))
    q, k, v = random_inputs(rng, 2, seq, 2, 128, jnp.bfloat16)
    _check(q, k, v, jnp.ones((2, seq), jnp.int32), causal=True, window=None, rng=rng,
           forward_tol=2e-2, grad_tol=3e-2)


def test_block_size_and_padding():
    """Global layers take 512-row blocks, local ones 128; short sequences one block of S
    rounded up to 128 (Ettin's 7999 is padded to 8192 globally, 8064 locally)."""
    assert block_size(1024, local=False) == 512 and block_size(1024, local=True) == 128
    assert block_size(7999, local=False) == 512 and block_size(7999, local=True) == 128
    assert block_size(200, local=False) == 256 and block_size(5, local=False, block=256) == 128
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        block_size(1024, local=False, block=100)


def test_bad_arguments_are_named(rng):
    q, k, v = random_inputs(rng, 1, 16, 1, 64)
    with pytest.raises(ValueError, match="window"):
        splash_attention(q, k, v, window=(-1, 3))
    with pytest.raises(ValueError, match="segment_ids shape"):
        splash_attention(q, k, v, segment_ids=jnp.ones((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="one shape"):
        splash_attention(q, k[:, :8], v)


# Per-shard execution under a sharded jit: test_flash_attention.py
# (test_sharded_over_runs_each_shard_on_its_device), for both kernels.


# attention_impl "auto" (ettin_jax.models.attention.AUTO); on TPU: test_tpu_aot.py.

def test_auto_is_xla_on_cpu_bit_for_bit(rng):
    """On CPU "auto" lowers to the XLA implementation: the same loss and gradients, bit for bit,
    for a causal local window over packed rows with padding."""
    from ettin_jax.models.attention import dot_product_attention

    seq = int(rng.integers(30, 60))
    q, k, v = random_inputs(rng, 3, seq, 2, 64)
    segments = jnp.asarray(random_segments(rng, 3, seq))

    def loss(q, k, v, impl):
        out = dot_product_attention(q, k, v, segments, causal=True, window=(7, 0), impl=impl)
        return jnp.sum(out * q)

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
    (value, grads), (ref_value, ref_grads) = step(q, k, v, "auto"), step(q, k, v, "xla")
    assert float(value) == float(ref_value)
    for grad, ref in zip(grads, ref_grads):
        assert np.array_equal(np.asarray(grad), np.asarray(ref))


def test_auto_model_logits_equal_xla_on_cpu(rng):
    """A model with attention_impl "auto" computes the "xla" model's logits exactly on CPU."""
    from conftest import randomized_model, run_logits, small_config

    ids = jnp.asarray(rng.integers(5, 1024, size=(2, 24)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 2, 0), jnp.int32)
    logits = [run_logits(randomized_model(small_config(attention_impl=impl, local_attention=8),
                                          "clm", seed=3), ids, segments)
              for impl in ("auto", "xla")]
    assert np.array_equal(np.asarray(logits[0]), np.asarray(logits[1]))


def test_auto_lowers_to_the_triton_kernels_for_a_gpu():
    """Lowered for CUDA (no GPU needed), "auto" is our flash attention's Triton kernels:
    forward, dq and dk/dv, and no other branch."""
    from ettin_jax.models.attention import dot_product_attention

    args = [jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16) for _ in range(3)]
    segments = jnp.ones((1, 300), jnp.int32)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, segments, causal=False, window=(64, 64),
                                    impl="auto")
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3
    assert "tpu_custom_call" not in text
