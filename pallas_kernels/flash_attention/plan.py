"""Which key blocks each query block visits (and back), decided before any kernel runs.

The sequence is cut into query blocks of `block_q` rows and key blocks of `block_k` rows. A pair
of blocks is visited only when
  - it intersects the causal / window band (static: from block indices alone), and
  - some query segment of the query block equals some key segment of the key block, judged by
    the blocks' ranges of non-padding segment ids (dynamic: from the data).
Visited key blocks of a query block form one contiguous run [lo, lo + count) (with packed
rows, documents are contiguous; for other layouts the run is the hull, and the mask inside the
kernel stays exact). The kernels' grids have `kv_steps` (or `q_steps`) entries per block, the
static maximum over blocks of the band alone: a local layer visits O(window) keys per query
whatever the sequence length, and steps beyond a block's `count` compute nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention.mask import Window

@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static tiling of one attention call.

    seq_len: the padded sequence length (a multiple of both block sizes). kv_steps: key blocks
    a query block may visit (grid size of the forward and dq kernels along keys); q_steps:
    query blocks a key block may be visited by (grid size of the dk/dv kernel).
    """

    seq_len: int
    block_q: int
    block_k: int
    causal: bool
    window: Window | None
    kv_steps: int
    q_steps: int

    @property
    def num_q_blocks(self) -> int:
        return self.seq_len // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.seq_len // self.block_k

    def band(self, xp=np):
        """bool [num_q_blocks, num_k_blocks]: block pairs that intersect the causal/window band
        (computed with the array module `xp`: numpy, or jax.numpy inside traced code, where
        it adds no constant)."""
        left, right = _reach(self.causal, self.window, self.seq_len)
        q_first = xp.arange(self.num_q_blocks)[:, None] * self.block_q
        k_first = xp.arange(self.num_k_blocks)[None, :] * self.block_k
        q_last, k_last = q_first + self.block_q - 1, k_first + self.block_k - 1
        # Some i in the query block and j in the key block with i - left <= j <= i + right.
        return (k_first <= q_last + right) & (k_last >= q_first - left)


def _reach(causal: bool, window: Window | None, seq_len: int) -> tuple[int, int]:
    """(left, right): how far before and after itself a query may see."""
    left, right = window if window is not None else (seq_len, seq_len)
    if causal:
        right = min(right, 0)
    return left, right


def make_plan(seq_len: int, *, causal: bool, window: Window | None, block_q: int,
              block_k: int) -> BlockPlan:
    """The tiling of a sequence of `seq_len` tokens into blocks of block_q queries and block_k
    keys (multiples of 8; powers of two for the GPU kernels). A shorter sequence shrinks a block
    to the next power of two that holds it. Raises ValueError for a bad block size or window.
    """
    if window is not None and (window[0] < 0 or window[1] < 0):
        raise ValueError(f"window {window} must be (left, right) with both >= 0")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 8 or size % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {size}")
    short = max(8, 1 << (seq_len - 1).bit_length())
    block_q, block_k = min(block_q, short), min(block_k, short)
    padded = _round_up(seq_len, np.lcm(block_q, block_k))
    plan = BlockPlan(padded, block_q, block_k, causal, window, 0, 0)
    band = plan.band()
    return dataclasses.replace(plan, kv_steps=int(band.sum(1).max()),
                               q_steps=int(band.sum(0).max()))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // int(multiple)) * int(multiple)


def _segment_ranges(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per block of `block` positions: (min, max) non-padding segment id, [B, blocks] each;
    a block of padding only gets the empty range (max int, 0)."""
    blocks = segment_ids.reshape(segment_ids.shape[0], -1, block)
    real = blocks != 0
    low = jnp.min(jnp.where(real, blocks, jnp.iinfo(jnp.int32).max), axis=-1)
    high = jnp.max(jnp.where(real, blocks, 0), axis=-1)
    return low, high


def _runs(visit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First index and length of the hull of True entries along the last axis (0, 0 if none)."""
    size = visit.shape[-1]
    index = jnp.arange(size, dtype=jnp.int32)
    first = jnp.min(jnp.where(visit, index, size), axis=-1)
    last = jnp.max(jnp.where(visit, index, -1), axis=-1)
    count = jnp.maximum(last - first + 1, 0)
    return jnp.where(count > 0, first, 0).astype(jnp.int32), count.astype(jnp.int32)


def visit_ranges(plan: BlockPlan, segment_ids: jax.Array) -> dict[str, jax.Array]:
    """The blocks each kernel visits, from padded segment ids [B, plan.seq_len] (int32).

    Returns int32 arrays: kv_first, kv_count [B, num_q_blocks] (key blocks of each query
    block, for the forward and dq kernels) and q_first, q_count [B, num_k_blocks] (query blocks
    of each key block, for the dk/dv kernel). Counts never exceed kv_steps / q_steps.
    """
    q_low, q_high = _segment_ranges(segment_ids, plan.block_q)
    k_low, k_high = _segment_ranges(segment_ids, plan.block_k)
    overlap = ((q_low[:, :, None] <= k_high[:, None, :])
               & (k_low[:, None, :] <= q_high[:, :, None]))
    visit = overlap & plan.band(jnp)[None]
    kv_first, kv_count = _runs(visit)
    q_first, q_count = _runs(jnp.swapaxes(visit, 1, 2))
    return {"kv_first": kv_first, "kv_count": kv_count, "q_first": q_first, "q_count": q_count}
