"""Masked-token packing: the Pallas kernel (interpret mode on CPU) and the XLA fallback against
numpy, the sparse MLM head against the dense one, the VJPs, overflow, and the kernels' lowering
for a GPU (Triton; the Mosaic compilation for a TPU is in test_tpu_aot.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masked_packing
from pallas_kernels.masked_packing import (
    capacity_for,
    overflow,
    pack_masked_tokens,
    unpack_masked_tokens,
)

IMPLS = ("pallas", "xla")
DENSITIES = (0.0, 0.15, 0.5, 1.0)


def random_case(rng: np.random.Generator, density: float, shape: tuple[int, ...] | None = None):
    """x [B, S, D] fp32 (random B, S, D unless `shape`) and a mask [B, S] of about `density`
    (exactly none or all at 0 and 1)."""
    batch, seq, width = shape or (int(rng.integers(2, 4)), int(rng.integers(16, 41)),
                                  int(rng.choice([32, 48, 128])))
    x = rng.normal(size=(batch, seq, width)).astype(np.float32)
    mask = rng.random((batch, seq)) < density
    if 0.0 < density < 1.0:  # a random draw could miss: keep the case partial
        mask.flat[rng.integers(0, mask.size)] = True
        mask.flat[rng.integers(0, mask.size)] = False
    return x, mask


def reference_pack(x: np.ndarray, mask: np.ndarray, capacity: int):
    """(values, indices, valid, count) by np.nonzero on the flat mask."""
    flat_x = x.reshape(-1, x.shape[-1])
    selected = np.nonzero(mask.reshape(-1))[0]
    kept = selected[:capacity]
    values = np.zeros((capacity, x.shape[-1]), x.dtype)
    values[:len(kept)] = flat_x[kept]
    indices = np.zeros(capacity, np.int32)
    indices[:len(kept)] = kept
    return values, indices, np.arange(capacity) < len(kept), len(selected)


@functools.partial(jax.jit, static_argnames=("capacity", "impl"))
def jit_pack(x, mask, capacity, impl):
    return pack_masked_tokens(x, mask, capacity, impl=impl)


@functools.partial(jax.jit, static_argnames=("shape", "impl"))
def jit_unpack(values, indices, valid, shape, impl):
    return unpack_masked_tokens(values, indices, valid, shape, impl=impl)


@pytest.mark.parametrize("density", DENSITIES)
def test_pack_matches_numpy_and_both_impls_agree(density, rng):
    x, mask = random_case(rng, density)
    count = int(mask.sum())
    capacity = mask.size if density == 1.0 else count + int(rng.integers(1, 6))
    expected = reference_pack(x, mask, capacity)
    results = {impl: jit_pack(jnp.asarray(x), jnp.asarray(mask), capacity, impl)
               for impl in IMPLS}
    for impl, packed in results.items():
        assert packed.values.dtype == jnp.float32 and packed.indices.dtype == jnp.int32
        for got, want in zip(packed, expected):
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=impl)
    for got_pallas, got_xla in zip(results["pallas"], results["xla"]):
        np.testing.assert_array_equal(np.asarray(got_pallas), np.asarray(got_xla))


def _nll_per_token(hidden, weight, labels):
    logits = jnp.tanh(hidden @ weight)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_head_loss_and_grads_match_dense(impl, density, rng):
    x, mask = random_case(rng, density)
    vocab = 24
    weight = rng.normal(0.0, 0.3, (x.shape[-1], vocab)).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, vocab, mask.shape), jnp.int32)
    token_weight = jnp.asarray(rng.uniform(0.5, 2.0, mask.shape), jnp.float32)
    capacity = mask.size if density == 1.0 else int(mask.sum()) + 3

    def sparse_loss(x, weight):
        packed = pack_masked_tokens(x, mask, capacity, impl=impl)
        nll = _nll_per_token(packed.values, weight, labels.reshape(-1)[packed.indices])
        return jnp.sum(jnp.where(packed.valid, token_weight.reshape(-1)[packed.indices] * nll, 0))

    def dense_loss(x, weight):
        return jnp.sum(jnp.where(mask, token_weight * _nll_per_token(x, weight, labels), 0))

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    loss, (gx, gw) = jax.jit(grad(sparse_loss))(jnp.asarray(x), jnp.asarray(weight))
    ref_loss, (ref_gx, ref_gw) = jax.jit(grad(dense_loss))(jnp.asarray(x), jnp.asarray(weight))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-5)
    assert not np.asarray(gx)[~mask].any()  # unselected positions get exactly no gradient
    if density > 0.0:
        assert np.abs(np.asarray(gx)[mask]).min(axis=-1).max() > 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_inverts_pack_and_the_vjps_are_each_others_move(impl, rng):
    x, mask = random_case(rng, 0.4, shape=(3, 57, 32))  # unpack: 171 rows, two kernel blocks
    capacity = int(mask.sum()) + 4
    flat_x = x.reshape(-1, x.shape[-1])
    packed = jit_pack(jnp.asarray(x), jnp.asarray(mask), capacity, impl)
    unpacked = jit_unpack(packed.values, packed.indices, packed.valid, x.shape, impl)
    np.testing.assert_array_equal(np.asarray(unpacked), np.where(mask[..., None], x, 0))

    indices, valid = np.asarray(packed.indices), np.asarray(packed.valid)
    # VJP of unpack in packed_values: gather the cotangent at the valid slots' positions.
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    unpack = functools.partial(unpack_masked_tokens, indices=packed.indices, valid=packed.valid,
                               shape=x.shape, impl=impl)
    g_values = jax.jit(lambda v, g: jax.vjp(unpack, v)[1](g)[0])(packed.values, cotangent)
    expected = np.where(valid[:, None], cotangent.reshape(flat_x.shape)[indices], 0)
    np.testing.assert_array_equal(np.asarray(g_values), expected)

    # VJP of pack in x: scatter the valid slots' cotangent back to their positions.
    def pack(x):
        return pack_masked_tokens(x, mask, capacity, impl=impl).values

    slot_cotangent = rng.normal(size=(capacity, x.shape[-1])).astype(np.float32)
    g_x = jax.jit(lambda x, g: jax.vjp(pack, x)[1](g)[0])(x, slot_cotangent)
    expected = np.zeros_like(flat_x)
    expected[indices[valid]] = slot_cotangent[valid]
    np.testing.assert_array_equal(np.asarray(g_x), expected.reshape(x.shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_keeps_the_first_rows_and_reports_the_true_count(impl, rng):
    x, mask = random_case(rng, 0.6)
    count = int(mask.sum())
    capacity = count // 2
    packed = jit_pack(jnp.asarray(x), jnp.asarray(mask), capacity, impl)
    values, indices, valid, _ = reference_pack(x, mask, capacity)
    np.testing.assert_array_equal(np.asarray(packed.values), values)
    np.testing.assert_array_equal(np.asarray(packed.indices), indices)
    assert np.asarray(packed.valid).all() and valid.all()
    assert int(packed.count) == count
    assert int(overflow(packed, capacity)) == count - capacity > 0

    # Only the packed positions receive gradient; the dropped ones get none (not garbage).
    slot_weight = rng.normal(size=values.shape).astype(np.float32)
    g_x = jax.jit(jax.grad(lambda x: jnp.sum(
        pack_masked_tokens(x, mask, capacity, impl=impl).values * slot_weight)))(x)
    expected = np.zeros((mask.size, x.shape[-1]), np.float32)
    expected[indices] = slot_weight
    np.testing.assert_array_equal(np.asarray(g_x), expected.reshape(x.shape))

    roomy = jit_pack(jnp.asarray(x), jnp.asarray(mask), count, impl)
    assert int(overflow(roomy, count)) == 0 and int(roomy.count) == count
    with pytest.raises(ValueError, match="capacity"):
        overflow(packed, capacity + 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_under_jit_keeps_dtype_and_bits(impl, rng):
    x, mask = random_case(rng, 0.3)
    x = jnp.asarray(x, jnp.bfloat16)
    capacity = int(mask.sum()) + 2
    packed = jit_pack(x, jnp.asarray(mask), capacity, impl)
    assert packed.values.dtype == jnp.bfloat16
    values, indices, valid, _ = reference_pack(np.asarray(x), mask, capacity)
    np.testing.assert_array_equal(np.asarray(packed.values), values)
    unpacked = jit_unpack(packed.values, packed.indices, packed.valid, x.shape, impl)
    assert unpacked.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(unpacked), np.where(mask[..., None], x, 0))

    slot_weight = jnp.asarray(rng.normal(size=values.shape), jnp.bfloat16)
    g_x = jax.jit(jax.grad(lambda x: jnp.sum(
        (pack_masked_tokens(x, mask, capacity, impl=impl).values * slot_weight)
        .astype(jnp.float32))))(x)
    assert g_x.dtype == jnp.bfloat16
    expected = np.zeros((mask.size, x.shape[-1]), np.float32)
    expected[indices[valid]] = np.asarray(slot_weight, np.float32)[valid]
    np.testing.assert_array_equal(np.asarray(g_x, np.float32), expected.reshape(x.shape))


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernels_gather_rows_across_several_blocks(kernel, rng):
    # 300 output rows: several grid steps of either kernel, the last one partial.
    table = rng.normal(size=(203, 48)).astype(np.float32)
    rows = rng.integers(-1, table.shape[0], 300).astype(np.int32)
    rows[:5] = [-1, 0, table.shape[0] - 1, -1, 7]
    gather = {"tpu": functools.partial(masked_packing._gather_rows, impl="pallas"),
              "gpu": masked_packing._gather_rows_gpu}[kernel]
    for dtype in (jnp.float32, jnp.bfloat16):
        got = gather(jnp.asarray(table, dtype), jnp.asarray(rows), interpret=True)
        assert got.dtype == dtype
        expected = np.where(rows[:, None] >= 0, np.asarray(jnp.asarray(table, dtype))[rows], 0)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_gpu_kernel_lowers_through_triton():
    # Lowering needs no GPU: lowering for CUDA picks the Triton body, and this checks what the
    # Triton lowering accepts (power-of-two tiles...), forward and backward.
    def loss(x, mask):
        return jnp.sum(pack_masked_tokens(x, mask, 999).values.astype(jnp.float32) ** 2)

    for dtype in (jnp.float32, jnp.bfloat16):
        traced = jax.jit(jax.grad(loss)).trace(jax.ShapeDtypeStruct((4, 1024, 768), dtype),
                                               jax.ShapeDtypeStruct((4, 1024), jnp.bool_))
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @__gpu$xla.gpu.triton") == 2  # pack, and its VJP


def test_capacity_for_and_argument_checks(rng):
    # mean 60 + Bernstein's margin at 1e-12: 27.63 / 3 + sqrt(27.63^2 / 9 + 2 * 27.63 * 51).
    assert capacity_for(4, 100, 0.15) == 124
    assert capacity_for(2, 10, 1.0) == 20  # never more than every position
    assert capacity_for(2, 10, 0.0) == 1
    assert capacity_for(4, 100, 0.15, overflow_probability=1e-3) < 124
    with pytest.raises(ValueError, match="mask_ratio"):
        capacity_for(2, 10, 1.5)
    with pytest.raises(ValueError, match="overflow_probability"):
        capacity_for(2, 10, 0.3, overflow_probability=0.0)
    x, mask = random_case(rng, 0.5)
    with pytest.raises(ValueError, match="capacity"):
        pack_masked_tokens(x, mask, 0)
    with pytest.raises(ValueError, match="mask"):
        pack_masked_tokens(x, mask[:, 1:], 4)
    with pytest.raises(ValueError, match="impl"):
        pack_masked_tokens(x, mask, 4, impl="cuda")
    with pytest.raises(ValueError, match="width"):
        unpack_masked_tokens(jnp.zeros((4, 8)), jnp.zeros(4, jnp.int32), jnp.ones(4, bool),
                             (2, 3, 9))


@pytest.mark.parametrize("rows,seq", [(1, 16), (2, 64), (8, 128), (4, 1024), (8, 8192),
                                      (64, 7999)])
@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.3])
def test_capacity_covers_bernoulli_and_exact_masking(rows, seq, ratio):
    """The capacity covers Bernoulli masking of every token of the microbatch (the most that
    can be eligible) with overflow probability <= 1e-12 (the binomial's exact tail), which is
    at least mean + 7 standard deviations, and exact masking's per-row rounding."""
    from scipy.stats import binom

    n = rows * seq
    capacity = capacity_for(rows, seq, ratio)
    assert binom.sf(capacity, n, ratio) <= 1e-12  # P(selected > capacity)
    assert capacity >= min(n, n * ratio + 7 * np.sqrt(n * ratio * (1 - ratio)))
    assert capacity >= rows * round(ratio * seq)  # exact masking, every token eligible
    if n >= 8 * 8192 and ratio >= 0.15:  # where memory matters: no more than the old 10% slack
        assert capacity <= 1.1 * n * ratio


def test_capacity_fits_bernoulli_batches_that_a_10_percent_slack_does_not():
    from data_pipelines.objectives import IGNORE, mlm_inputs
    from data_pipelines.special_tokens import PROJECT

    rows, seq, ratio = 2, 64, 0.15
    ids = np.full((rows, seq), 100, np.int32)
    segments = np.ones((rows, seq), np.int32)
    counts = np.array([
        np.sum(mlm_inputs(ids, segments, seed=1, step=step, rows=np.arange(rows),
                          mask_ratio=ratio, special=PROJECT, vocab_size=300,
                          masking="bernoulli")["labels"] != IGNORE)
        for step in range(400)])
    assert counts.max() <= capacity_for(rows, seq, ratio)
    assert np.mean(counts > np.ceil(rows * seq * ratio * 1.1)) > 0.1  # the old slack overflowed
