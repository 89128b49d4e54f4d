"""JAX's TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with the mask
semantics, layout and sharding of our own `flash_attention`, so the model can run either.

    out = splash_attention(q, k, v, causal=True, window=(63, 0), segment_ids=segment_ids)

What this adds over JAX's kernel, which takes one example's q, k, v [H, S, D] and a static mask:
  - the mask of `flash_attention.mask.is_visible`: global `FullMask`, causal `CausalMask`,
    local windows (left, right) as `LocalMask` (inclusive bounds as ours; causal windows as
    (left, 0)), all heads alike (`MultiHeadMask`), packed documents as `SegmentIds`;
  - padding (segment 0) queries output exactly zero: splash lets padding tokens attend to each
    other (segment 0 == 0), so their outputs are zeroed, which also zeroes every gradient
    that flows from them (no real query sees a padding key, so theirs are zero too);
  - the softmax scale (splash does not scale): q is multiplied by `scale` (1/sqrt(D)) first,
    in q's dtype (exact for bf16 when D is a power of four, as Ettin's 64);
  - our layout [B, S, H, D]: transposed to [B, H, S, D] and vmapped over the batch;
  - any S: splash needs S to be a multiple of its blocks, so the sequence is padded with
    zeros of segment 0 to a multiple of the block (`block_size`) and the output sliced back;
  - the platform: Mosaic when lowered for a TPU, splash's interpret mode when lowered for a
    CPU (the tests), decided at lowering time by `lax.platform_dependent` as our kernels do.
    There is no GPU version: lowering for a GPU fails; use `flash_attention` there;
  - per-shard execution under a sharded step (`partitioning.attention_per_shard`).
Splash skips blocks outside the static causal/window band only; unlike our kernels it computes
blocks whose segments do not meet (packed documents, padding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels.flash_attention.mask import Window
from pallas_kernels.partitioning import ShardedOver, attention_per_shard

# Block size (query and key, forward and backward) when none is given: large blocks keep grid
# steps few on global layers; local layers take blocks near the window (Ettin's 128), so that
# little outside the band is computed. Short sequences take one block of S rounded up to the
# 128-row tile (`block_size`).
DEFAULT_BLOCKS = {"global": 512, "local": 128}
_TILE = 128  # the TPU lane width: every splash block is a multiple of it

__all__ = ["DEFAULT_BLOCKS", "block_size", "make_mask", "splash_attention"]


def block_size(seq_len: int, *, local: bool, block: int | None = None) -> int:
    """The splash block (rows of q and of k/v per grid step) used for `seq_len`: `block`, or
    DEFAULT_BLOCKS for a local (windowed) or global layer, capped at S rounded up to 128. The
    sequence is padded to a multiple of it. Raises ValueError unless block is a multiple of 128.
    """
    if block is not None and (block < _TILE or block % _TILE):
        raise ValueError(f"splash block must be a positive multiple of {_TILE}, got {block}")
    block = block or DEFAULT_BLOCKS["local" if local else "global"]
    return min(block, -(-seq_len // _TILE) * _TILE)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: Window | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block: int | None = None,
    interpret: bool | None = None,
    sharded_over: ShardedOver | None = None,
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, H, D] (fp32 or bf16) by JAX's splash kernels,
    differentiable in q, k, v, with the masks and results of `flash_attention`.

    causal: keys after the query are invisible. window (left, right): key j is visible from
    query i iff i - left <= j <= i + right (with causal, right is 0). segment_ids [B, S] int:
    a query sees only keys of its segment; 0 marks padding, whose outputs are zeros. scale:
    1/sqrt(D) by default. block: splash's tile (multiple of 128; default `block_size`).
    interpret: None picks Mosaic when lowered for TPU and interpret mode when lowered for CPU.
    sharded_over: as `flash_attention` (None: the enclosing `kernels_sharded_over` block's).
    Returns [B, S, H, D] in q's dtype. Raises ValueError on mismatched shapes or a bad window.
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
    if window is not None:
        window = (int(window[0]), 0 if causal else int(window[1]))
        if min(window) < 0:
            raise ValueError(f"window (left, right) must be >= 0, got {window}")
    padded = -(-seq_len // (tile := block_size(seq_len, local=window is not None, block=block)))
    attention = functools.partial(
        _attention, causal=causal, window=window, padded_len=padded * tile, block=tile,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale), interpret=interpret)
    return attention_per_shard(attention, sharded_over)(q, k, v, segment_ids.astype(jnp.int32))


def make_mask(seq_len: int, heads: int, *, causal: bool,
              window: Window | None) -> splash.MultiHeadMask:
    """Splash's static mask of `heads` alike heads over `seq_len` queries and keys: global
    (`FullMask`), causal (`CausalMask`) or a local window (left, right) (`LocalMask`, right
    taken as 0 when causal). Segments are not part of it (splash takes them as `SegmentIds`)."""
    shape = (seq_len, seq_len)
    if window is not None and causal:
        window = (window[0], 0)
    if window is not None:
        one = splash.LocalMask(shape, window, offset=0)
    else:
        one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    return splash.MultiHeadMask([one] * heads)


def _attention(q, k, v, segment_ids, *, causal, window, padded_len, block, scale, interpret):
    """One shard: [B, S, H, D] in and out; pads S, runs splash per example, zeroes padding."""
    batch, seq_len, heads, _ = q.shape
    pad = padded_len - seq_len

    def kernel_layout(x):  # [B, S, H, D] -> [B, H, S', D]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)

    segments = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    args = (kernel_layout(q * jnp.asarray(scale, q.dtype)), kernel_layout(k), kernel_layout(v),
            segments)

    def run(interpret: bool):
        kernel = splash.make_splash_mha(
            make_mask(padded_len, heads, causal=causal, window=window),
            block_sizes=splash.BlockSizes(*(block,) * 2, block_q_dkv=block, block_kv_dkv=block,
                                          block_q_dq=block, block_kv_dq=block),
            head_shards=1, q_seq_shards=1, interpret=interpret)

        def one_example(q, k, v, segments):
            return kernel(q, k, v, segment_ids=splash.SegmentIds(segments, segments))

        return lambda *arrays: jax.vmap(one_example)(*arrays)

    if interpret is not None:
        out = run(interpret)(*args)
    else:
        out = lax.platform_dependent(*args, cpu=run(True), default=run(False))
    out = out.swapaxes(1, 2)[:, :seq_len]
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
