"""The arithmetic on one (query block, key block) tile, shared by the TPU and GPU kernels.

Forward: online softmax (running max `m`, running sum `l`, unnormalised output `acc`), the
logsumexp saved for the backward pass. Backward (FlashAttention-2): probabilities recomputed
from the logsumexp, dS = P * (dP - delta) with delta = rowsum(dO * O). Scores are fp32; matrix
products take the inputs' dtype and accumulate in fp32. Shapes: query tiles [bq, D], key tiles
[bk, D], per-row statistics [bq, 1], segment ids [bq, 1] and [1, bk].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention.mask import Window, is_visible

# Score of an invisible key: finite, so that rows seeing nothing yet stay NaN-free.
MASKED = -1e30


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32)


def scores(q: jax.Array, k: jax.Array, q_start, k_start, q_segment: jax.Array,
           k_segment: jax.Array, *, scale: float, causal: bool,
           window: Window | None) -> tuple[jax.Array, jax.Array]:
    """(scaled scores fp32 [bq, bk], visibility bool [bq, bk]) of a tile whose first query and
    key sit at sequence positions q_start and k_start."""
    s = _dot(q, k, (1, 1)) * scale
    rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return s, is_visible(rows, cols, q_segment, k_segment, causal=causal, window=window)


def online_softmax(m: jax.Array, l: jax.Array, acc: jax.Array, s: jax.Array,
                   visible: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds one key tile into the running (max, sum, output) of a query tile."""
    s = jnp.where(visible, s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + _dot(p.astype(v.dtype), v, (1, 0))
    return m_new, l_new, acc_new


def initial_state(block_q: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, l, acc) before any key tile."""
    return (jnp.full((block_q, 1), MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))


def finish(m: jax.Array, l: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(output fp32 [bq, D], logsumexp [bq, 1]); zero output and logsumexp for a row that saw
    no key."""
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def probabilities(s: jax.Array, visible: jax.Array, lse: jax.Array) -> jax.Array:
    """Softmax probabilities [bq, bk] of a tile, recomputed from the saved logsumexp."""
    return jnp.where(visible, jnp.exp(s - lse), 0.0)


def score_gradient(p: jax.Array, do: jax.Array, v: jax.Array, delta: jax.Array,
                   scale: float) -> jax.Array:
    """d(loss)/d(q k^T) [bq, bk] of a tile, the scale folded in."""
    dp = _dot(do, v, (1, 1))
    return p * (dp - delta) * scale


def dq_part(ds: jax.Array, k: jax.Array) -> jax.Array:
    """This tile's contribution to dq [bq, D]."""
    return _dot(ds.astype(k.dtype), k, (1, 0))


def dk_part(ds: jax.Array, q: jax.Array) -> jax.Array:
    """This tile's contribution to dk [bk, D]."""
    return _dot(ds.astype(q.dtype), q, (0, 0))


def dv_part(p: jax.Array, do: jax.Array) -> jax.Array:
    """This tile's contribution to dv [bk, D]."""
    return _dot(p.astype(do.dtype), do, (0, 0))
