"""Attention: the one definition of who may see whom, and the switch between implementations.

Mask semantics (used by every implementation, and by the Pallas kernels):
  query i may attend key j iff
    segment_ids[i] == segment_ids[j] != 0         (same packed document; 0 is padding)
    and (not causal or j <= i)                    (decoder)
    and (window is None or i - left <= j <= i + right)   (local layers, inclusive bounds)
  A padding query (segment 0) sees nothing and its output is exactly zero.

Local windows follow HuggingFace so that exported models reproduce our logits:
  encoder (bidirectional): |i - j| <= local_attention // 2          -> (w, w),     w = L // 2
  decoder (causal):        the w most recent keys, itself included  -> (w - 1, 0)
Ettin's flash-attn training used (w, 0) for the decoder, one key more; we pick HF's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ettin_jax.errors import did_you_mean

Window = tuple[int, int]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas", "cudnn")


def local_window(local_attention: int, *, causal: bool) -> Window:
    """(left, right) inclusive key offsets of a local layer with full window `local_attention`."""
    half = local_attention // 2
    return (half - 1, 0) if causal else (half, half)


def is_visible(
    q_index: jax.Array,
    k_index: jax.Array,
    q_segment: jax.Array,
    k_segment: jax.Array,
    *,
    causal: bool,
    window: Window | None,
) -> jax.Array:
    """Elementwise (broadcasting) visibility of key `k_index` from query `q_index`.

    Takes sequence indices and segment ids of queries and keys, arrays that broadcast against
    each other. Returns a bool array of the broadcast shape. This is the single definition of
    the attention mask; blocked kernels call it on block-local index grids.
    """
    visible = (q_segment == k_segment) & (k_segment != 0)
    if causal:
        visible &= k_index <= q_index
    if window is not None:
        left, right = window
        visible &= (k_index >= q_index - left) & (k_index <= q_index + right)
    return visible


def visibility_mask(segment_ids: jax.Array, *, causal: bool, window: Window | None) -> jax.Array:
    """Dense mask for self-attention over `segment_ids` [B, S]: bool [B, 1, S, S] (q, k)."""
    seq_len = segment_ids.shape[-1]
    index = jnp.arange(seq_len)
    return is_visible(
        index[:, None],
        index[None, :],
        segment_ids[:, None, :, None],
        segment_ids[:, None, None, :],
        causal=causal,
        window=window,
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    causal: bool,
    window: Window | None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, heads, head_dim] under the mask semantics above.

    `segment_ids` [B, S] int (1..n documents, 0 padding). Scale 1/sqrt(head_dim); softmax in
    fp32. Returns [B, S, heads, head_dim] in v's dtype, zero at padding queries.
    `impl`: "xla" (reference, runs everywhere), "pallas" (pallas_kernels.flash_attention),
    "cudnn" (jax.nn.dot_product_attention on a CUDA GPU).
    """
    if impl == "xla":
        out = _xla_attention(q, k, v, visibility_mask(segment_ids, causal=causal, window=window))
    elif impl == "pallas":
        out = _pallas_attention(q, k, v, segment_ids, causal=causal, window=window)
    elif impl == "cudnn":
        out = _cudnn_attention(q, k, v, segment_ids, causal=causal, window=window)
    else:
        raise ValueError(
            f"unknown attention implementation {impl!r}.{did_you_mean(impl, IMPLEMENTATIONS)} "
            f"Valid: {', '.join(IMPLEMENTATIONS)}"
        )
    query_is_real = (segment_ids != 0)[:, :, None, None]
    return jnp.where(query_is_real, out, jnp.zeros((), out.dtype))


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # A finite floor (not -inf) keeps rows with no visible key (padding queries) NaN-free;
    # their outputs are zeroed by the caller.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pallas_attention(q, k, v, segment_ids, *, causal, window):
    try:
        from pallas_kernels import flash_attention
    except ImportError as err:
        raise ValueError(
            "attention_impl='pallas' needs pallas_kernels.flash_attention, which this version "
            "of ettin-jax does not provide yet; use attention_impl='xla'"
        ) from err
    return flash_attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids)


def _cudnn_attention(q, k, v, segment_ids, *, causal, window):
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a CUDA GPU, but JAX runs on "
            f"{jax.default_backend()!r}; use attention_impl='xla' (or 'pallas')"
        )
    # cuDNN natively skips the causal triangle and a left window; segments and a bidirectional
    # window are passed as an explicit mask, which it also supports (without block skipping).
    native_window = window if causal else None
    mask = visibility_mask(
        segment_ids, causal=False, window=None if causal else window
    )
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, local_window_size=native_window,
        implementation="cudnn",
    )
