"""Attention as plain XLA ops: the dense [B, H, S, S] computation that the kernels must match.

It is the model's `attention_impl="xla"` and the reference of the kernel tests and benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.mask import Window, visibility_mask


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: Window | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, H, D] under the mask of `mask.is_visible`.

    segment_ids [B, S] int (1..n documents, 0 padding; None: one document). Scores and softmax
    in fp32; scale 1/sqrt(D) by default. Returns [B, S, H, D] in v's dtype, zero at padding
    queries and for queries that see no key.
    """
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    mask = visibility_mask(segment_ids, causal=causal, window=window)
    return masked_attention(q, k, v, mask, scale=scale)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """Softmax attention of queries q [B, Sq, H, D] over keys and values k, v [B, Sk, H, D],
    where bool `mask` (broadcasting to [B, H, Sq, Sk]) says which keys each query sees.

    The numerics of `reference_attention` (which is this under `visibility_mask`): fp32 scores
    and softmax, scale 1/sqrt(D) by default. Returns [B, Sq, H, D] in v's dtype, zero for
    queries that see no key.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # A finite floor (not -inf) keeps rows with no visible key NaN-free; they are zeroed below.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
