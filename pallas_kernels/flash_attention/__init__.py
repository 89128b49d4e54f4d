"""Flash attention for Ettin's global, local (sliding-window) and packed (segment) attention.

    out = flash_attention(q, k, v, causal=True, window=(63, 0), segment_ids=segment_ids)

Forward and backward are Pallas kernels (FlashAttention-2: online softmax, the logsumexp saved
for the backward pass, probabilities recomputed there) with the mask of `mask.is_visible`.
Block pairs outside the causal/window band, or whose segment ranges do not meet, are never
computed (`plan`). Backends: TPU through Mosaic (`tpu.py`), GPU through Pallas' Triton
lowering (`gpu.py`); both run on CPU in interpret mode, which the tests use.

Why by hand: `jax.nn.dot_product_attention` (cuDNN) cannot skip blocks for packed segments or
a bidirectional window, and XLA materialises the [S, S] scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.mask import Window, is_visible, visibility_mask
from pallas_kernels.flash_attention.plan import BlockPlan, make_plan, visit_ranges
from pallas_kernels.flash_attention.reference import reference_attention

BACKENDS = ("tpu", "gpu")

__all__ = ["BACKENDS", "BlockPlan", "Window", "flash_attention", "is_visible", "make_plan",
           "reference_attention", "visibility_mask", "visit_ranges"]


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: Window | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, H, D] (fp32 or bf16), differentiable in q, k, v.

    causal: keys after the query are invisible. window (left, right): key j is visible from
    query i iff i - left <= j <= i + right (with causal, right is 0). segment_ids [B, S] int:
    a query sees only keys of its segment; 0 marks padding, whose outputs are zeros (no NaN,
    also for a row that is all padding). scale: 1/sqrt(D) by default. block_q / block_k:
    tiling (default: the backend's DEFAULT_BLOCKS for global or local attention). backend: "tpu" or "gpu" kernels; None picks by
    jax.default_backend() (the TPU kernels elsewhere). interpret: run the kernels in Pallas'
    interpret mode; None does so when JAX runs on CPU. Any S: sequences are padded internally.
    Returns [B, S, H, D] in q's dtype.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, S, H, D], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    batch, seq_len = q.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq_len), jnp.int32)
    if segment_ids.shape != (batch, seq_len):
        raise ValueError(f"segment_ids shape {segment_ids.shape} != (batch, seq) "
                         f"{(batch, seq_len)}")
    backend = backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    defaults = _kernels(backend).DEFAULT_BLOCKS["global" if window is None else "local"]
    plan = make_plan(seq_len, causal=causal, window=window, block_q=block_q or defaults[0],
                     block_k=block_k or defaults[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention(q, k, v, segment_ids.astype(jnp.int32), plan, scale, backend, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segment_ids, plan, scale, backend, interpret):
    return _forward(q, k, v, segment_ids, plan, scale, backend, interpret)[0]


def _layout(q, k, v, segment_ids, plan: BlockPlan):
    """[B, S, H, D] -> padded [B, H, S', D], and the padded segment ids [B, S']."""
    pad = plan.seq_len - q.shape[1]
    to_heads = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)  # noqa: E731
    return to_heads(q), to_heads(k), to_heads(v), jnp.pad(segment_ids, ((0, 0), (0, pad)))


def _kernels(backend: str):
    return tpu if backend == "tpu" else gpu


def _forward(q, k, v, segment_ids, plan, scale, backend, interpret):
    qh, kh, vh, segments = _layout(q, k, v, segment_ids, plan)
    ranges = visit_ranges(plan, segments)
    out, lse = _kernels(backend).forward(qh, kh, vh, segments, ranges, plan, scale=scale,
                                         interpret=interpret)
    result = out.swapaxes(1, 2)[:, :q.shape[1]]
    return result, (q, k, v, segment_ids, out, lse)


def _backward(plan, scale, backend, interpret, residuals, d_result):
    q, k, v, segment_ids, out, lse = residuals
    seq_len = q.shape[1]
    qh, kh, vh, segments = _layout(q, k, v, segment_ids, plan)
    d_out = jnp.pad(d_result, ((0, 0), (0, plan.seq_len - seq_len), (0, 0), (0, 0)))
    ranges = visit_ranges(plan, segments)
    grads = _kernels(backend).backward(qh, kh, vh, segments, ranges, plan, out, lse,
                                       d_out.swapaxes(1, 2), scale=scale, interpret=interpret)
    dq, dk, dv = (g.swapaxes(1, 2)[:, :seq_len] for g in grads)
    return dq, dk, dv, None


_attention.defvjp(
    lambda q, k, v, segment_ids, plan, scale, backend, interpret:
        _forward(q, k, v, segment_ids, plan, scale, backend, interpret),
    _backward)
