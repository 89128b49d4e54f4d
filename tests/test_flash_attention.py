"""Flash attention kernels (TPU and GPU bodies, interpret mode on CPU) against the XLA reference,
their block skipping, and their lowering for a GPU (Triton IR; the Mosaic compilation for a TPU
is in test_tpu_aot.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, Mesh, NamedSharding

from pallas_kernels.flash_attention import (
    flash_attention,
    make_plan,
    reference_attention,
    visit_ranges,
)
from pallas_kernels.partitioning import ShardedOver

MASKS = [(False, None), (True, None), (False, (5, 9)), (True, (7, 0))]


def random_segments(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Packed documents of random lengths, one of length 1, tail padding; the last row is all
    padding."""
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch - 1):
        end = int(rng.integers(seq // 2, seq + 1))
        cuts = np.sort(rng.choice(np.arange(1, end), size=3, replace=False))
        cuts[1] = cuts[0] + 1  # a document of one token
        segments[row, :end] = np.searchsorted(cuts, np.arange(end), side="right") + 1
    return segments


def random_inputs(rng, batch, seq, heads, head_dim, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype)
                 for _ in range(3))


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def check_against_reference(q, k, v, segments, *, forward_tol=1e-5, grad_tol=1e-4, rng,
                            attention=flash_attention, **kwargs):
    """Forward and all three gradients (random cotangent) of `attention` (flash_attention,
    or another kernel with its interface) against reference_attention."""
    mask = dict(causal=kwargs.pop("causal"), window=kwargs.pop("window"),
                segment_ids=segments)
    out, vjp = jax.vjp(lambda *a: attention(*a, **mask, **kwargs), q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: reference_attention(*a, **mask), q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    assert bool(jnp.all(out[segments == 0] == 0))  # padding queries: exactly zero
    assert _relative_error(out, ref) <= forward_tol
    cotangent = jnp.asarray(rng.normal(size=q.shape), q.dtype)
    for name, grad, ref_grad in zip("qkv", vjp(cotangent), ref_vjp(cotangent)):
        assert bool(jnp.all(jnp.isfinite(grad))), name
        assert _relative_error(grad, ref_grad) <= grad_tol, name


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("causal, window", MASKS)
def test_matches_the_xla_reference(rng, backend, causal, window):
    seq = int(rng.integers(20, 70))
    q, k, v = random_inputs(rng, 3, seq, 2, 64)
    segments = jnp.asarray(random_segments(rng, 3, seq))
    blocks = [int(b) for b in rng.choice([8, 16, 32], 2)]
    check_against_reference(q, k, v, segments, causal=causal, window=window, backend=backend,
                             block_q=blocks[0], block_k=blocks[1], interpret=True, rng=rng)


def test_head_dim_128_bf16_and_one_document(rng):
    q, k, v = random_inputs(rng, 2, 45, 2, 128, jnp.bfloat16)
    for backend in ("tpu", "gpu"):
        out = flash_attention(q, k, v, causal=True, backend=backend, block_q=16, block_k=16)
        assert out.dtype == jnp.bfloat16
        expected = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
        assert _relative_error(out, expected) < 2e-2  # bf16 inputs, fp32 statistics


def test_tpu_kernels_in_tpu_interpret_mode(rng):
    """The Mosaic kernels under Pallas' TPU interpreter (simulated VMEM, SMEM and DMAs)."""
    q, k, v = random_inputs(rng, 2, 40, 2, 64)
    segments = jnp.asarray(random_segments(rng, 2, 40))
    try:
        check_against_reference(q, k, v, segments, causal=True, window=(6, 0), backend="tpu",
                                 block_q=16, block_k=8, interpret=pltpu.InterpretParams(),
                                 rng=rng)
    finally:
        pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_blocks_outside_the_band_or_segments_are_never_read(rng, backend):
    """NaN planted in key blocks that a query block must skip: its outputs and gradients stay
    finite and exact. A dense masked computation would turn every row NaN (0 * NaN)."""
    q, k, v = random_inputs(rng, 1, 64, 2, 64)
    poisoned = v.at[:, 48:].set(jnp.nan)  # key block 3 of 4
    for causal, window, clean_rows in [(True, None, 48), (False, (4, 4), 40)]:
        kwargs = dict(causal=causal, window=window, backend=backend, block_q=8, block_k=16)
        out = flash_attention(q, k, poisoned, **kwargs)
        expected = reference_attention(q, k, v, causal=causal, window=window)
        assert _relative_error(out[:, :clean_rows], expected[:, :clean_rows]) <= 1e-5
        dq = jax.grad(lambda x: jnp.sum(flash_attention(x, k, poisoned, **kwargs)[:, :clean_rows]))(q)
        assert bool(jnp.all(jnp.isfinite(dq[:, :clean_rows])))
    # Two documents: the first never reads the second's blocks.
    segments = jnp.asarray([[1] * 32 + [2] * 32])
    poisoned = v.at[:, 32:].set(jnp.nan)
    out = flash_attention(q, k, poisoned, segment_ids=segments, backend=backend, block_q=16,
                          block_k=16)
    expected = reference_attention(q, k, v, segment_ids=segments)
    assert _relative_error(out[:, :32], expected[:, :32]) <= 1e-5


def test_local_layers_visit_a_constant_number_of_blocks_per_query_block():
    """O(S * window): the band of a (64, 64) window spans the same few key blocks per query
    block at S = 1024 and 8192; global causal attention spans them all."""
    local = [make_plan(seq, causal=False, window=(64, 64), block_q=128, block_k=128)
             for seq in (1024, 8192)]
    assert local[0].kv_steps == local[1].kv_steps == 3
    assert local[1].q_steps == 3
    causal = make_plan(8192, causal=True, window=None, block_q=512, block_k=512)
    assert causal.kv_steps == causal.num_k_blocks == 16
    ranges = visit_ranges(local[1], jnp.ones((1, 8192), jnp.int32))
    assert int(jnp.sum(ranges["kv_count"])) <= 3 * local[1].num_q_blocks


def test_visit_ranges_follow_segments_and_skip_padding():
    plan = make_plan(64, causal=False, window=None, block_q=16, block_k=16)
    segments = jnp.asarray([[1] * 20 + [2] * 28 + [0] * 16,   # documents end inside a block
                            [0] * 64])                        # all padding
    ranges = {k: np.asarray(v) for k, v in visit_ranges(plan, segments).items()}
    # Query blocks: 0 = doc 1, 1 = docs 1 and 2, 2 = doc 2, 3 = padding.
    assert ranges["kv_first"][0].tolist() == [0, 0, 1, 0]
    assert ranges["kv_count"][0].tolist() == [2, 3, 2, 0]
    assert ranges["kv_count"][1].tolist() == [0, 0, 0, 0]
    assert ranges["q_count"][0].tolist() == [2, 3, 2, 0]


def test_bad_arguments_are_named(rng):
    q, k, v = random_inputs(rng, 1, 16, 2, 64)
    with pytest.raises(ValueError, match="share one shape"):
        flash_attention(q, k[:, :8], v)
    with pytest.raises(ValueError, match="segment_ids shape"):
        flash_attention(q, k, v, segment_ids=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 8"):
        flash_attention(q, k, v, block_k=12)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=(-1, 3))


@pytest.mark.parametrize("kernel", ["flash", "splash"])
def test_sharded_over_runs_each_shard_on_its_device(kernel):
    """Under a jit whose batch is split over 4 devices (and heads over 2), each device runs the
    kernels (ours, or JAX's splash behind our masks) on its own shard: no all-gather, sharded
    gradients, the reference's values. (Without `sharded_over` XLA gathers every input onto
    every device.)"""
    from pallas_kernels.splash import splash_attention

    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 8, 40, 2, 64)
    segments = jnp.asarray(np.repeat(np.arange(1, 5), 10)[None].repeat(8, 0))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"),
                axis_types=(AxisType.Auto,) * 2)
    sharded_over = ShardedOver(mesh, batch=("data",), heads=("tensor",))
    heads = NamedSharding(mesh, sharded_over.spec("batch", None, "heads", None))

    def loss(q, k, v, **kwargs):
        attention = ({"flash": flash_attention, "splash": splash_attention}[kernel] if kwargs
                     else reference_attention)
        return jnp.sum(attention(q, k, v, causal=True, segment_ids=segments, **kwargs) ** 2)

    step = jax.jit(jax.value_and_grad(functools.partial(loss, sharded_over=sharded_over),
                                      (0, 1, 2)), in_shardings=(heads, heads, heads))
    assert "all-gather" not in step.lower(q, k, v).compile().as_text()
    value, grads = step(q, k, v)
    expected, expected_grads = jax.value_and_grad(loss, (0, 1, 2))(q, k, v)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    for grad, ref in zip(grads, expected_grads):
        assert grad.sharding.spec == heads.spec and _relative_error(grad, ref) <= 1e-4


def test_gpu_kernels_lower_through_triton():
    """Lowering for CUDA needs no GPU: the platform picks the Triton kernels, and Triton's
    constraints (power-of-two tiles, its op set) hold for the forward and both backward
    kernels at an Ettin shape."""
    args = [jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16) for _ in range(3)]
    for causal, window in MASKS:
        def loss(q, k, v):
            out = flash_attention(q, k, v, causal=causal, window=window)
            return jnp.sum(out.astype(jnp.float32))

        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
            lowering_platforms=("cuda",))
        # forward, dq, dk/dv
        assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 3
