"""Who may attend to whom: the one definition of the attention mask, used by the XLA reference,
every kernel (on block-local index grids) and the model.

  query i may attend key j iff
    segment_ids[i] == segment_ids[j] != 0         (same packed document; 0 is padding)
    and (not causal or j <= i)                    (decoder)
    and (window is None or i - left <= j <= i + right)   (local layers, inclusive bounds)
  A padding query (segment 0) sees nothing and its output is exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Window = tuple[int, int]


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
    each other. Returns a bool array of the broadcast shape.
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
    index = jnp.arange(segment_ids.shape[-1])
    return is_visible(
        index[:, None],
        index[None, :],
        segment_ids[:, None, :, None],
        segment_ids[:, None, None, :],
        causal=causal,
        window=window,
    )
