"""Rotary position embeddings (GPT-NeoX rotate-half layout over the full head_dim)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its packed document: 0 at a segment's first token.

    Takes segment_ids [B, S]; returns int32 [B, S]. A new document starts wherever the id
    changes (padding runs count from 0 too; their positions are never used).
    """
    seq_len = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, S, 1, head_dim] (fp32) for integer `positions` [B, S].

    inv_freq = 1 / theta ** (arange(0, d, 2) / d), duplicated over both halves.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, S, heads, head_dim] by the tables; computed in fp32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
