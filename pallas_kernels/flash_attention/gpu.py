"""Flash attention kernels for GPU (Pallas' Triton lowering): one program per (batch, head,
block), looping over the visited blocks of the other side.

A program holds its query block (or key block) in registers and walks the visited range of
`plan.visit_ranges` with a dynamic-length loop, so skipped blocks cost nothing. The other side
stays whole in global memory and is sliced per step. Layouts: q, k, v, o [B, H, S, D];
logsumexp and delta [B, H, S]; segment ids [B, S]; visit ranges [B, blocks, 2] (first, count).
Block sizes must be powers of two for Triton (the defaults are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention.plan import BlockPlan


# Triton (not Mosaic GPU, the other GPU lowering): the one that runs on every CUDA GPU JAX
# supports.
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=2)

# (block_q, block_k): tiles that fit a streaming multiprocessor's registers and shared memory.
DEFAULT_BLOCKS = {"global": (128, 64), "local": (64, 64)}


def _specs(plan: BlockPlan, head_dim: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs for a grid (b, h, block): `*_block` is this program's block, `*_all` the whole
    sequence of the other side."""
    sq, seq = pl.squeezed, plan.seq_len
    return {
        "q_block": pl.BlockSpec((sq, sq, plan.block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
        "k_block": pl.BlockSpec((sq, sq, plan.block_k, head_dim), lambda b, h, i: (b, h, i, 0)),
        "all": pl.BlockSpec((sq, sq, seq, head_dim), lambda b, h, i: (b, h, 0, 0)),
        "row_block": pl.BlockSpec((sq, sq, plan.block_q), lambda b, h, i: (b, h, i)),
        "row_all": pl.BlockSpec((sq, sq, seq), lambda b, h, i: (b, h, 0)),
        "q_segment": pl.BlockSpec((sq, plan.block_q), lambda b, h, i: (b, i)),
        "k_segment": pl.BlockSpec((sq, plan.block_k), lambda b, h, i: (b, i)),
        "segment_all": pl.BlockSpec((sq, seq), lambda b, h, i: (b, 0)),
        "range": pl.BlockSpec((sq, sq, 2), lambda b, h, i: (b, i, 0)),
    }


def _ranges(ranges: dict[str, jax.Array], side: str) -> jax.Array:
    return jnp.stack([ranges[f"{side}_first"], ranges[f"{side}_count"]], axis=-1)


def forward(q, k, v, segments, ranges, plan: BlockPlan, *, scale: float,
            interpret) -> tuple[jax.Array, jax.Array]:
    """(output [B, H, S, D] in q's dtype, logsumexp [B, H, S] fp32) of q, k, v [B, H, S, D]
    with segment ids [B, S] and the visit ranges of `plan.visit_ranges`."""
    batch, heads, seq, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k
    spec = _specs(plan, head_dim)

    def kernel(range_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref):
        q_start = pl.program_id(2) * bq
        query, q_segment = q_ref[...], qs_ref[...][:, None]

        def visit(step, carry):
            keys = pl.ds(pl.multiple_of((range_ref[0] + step) * bk, bk), bk)
            s, visible = tiles.scores(query, k_ref[keys, :], q_start, keys.start, q_segment,
                                      ks_ref[keys][None, :], scale=scale, causal=plan.causal,
                                      window=plan.window)
            return tiles.online_softmax(*carry, s, visible, v_ref[keys, :])

        state = lax.fori_loop(0, range_ref[1], visit, tiles.initial_state(bq, head_dim))
        out, lse = tiles.finish(*state)
        o_ref[...], lse_ref[...] = out.astype(o_ref.dtype), lse[:, 0]

    return tuple(pl.pallas_call(
        kernel, grid=(batch, heads, plan.num_q_blocks),
        in_specs=[spec["range"], spec["q_block"], spec["all"], spec["all"], spec["q_segment"],
                  spec["segment_all"]],
        out_specs=[spec["q_block"], spec["row_block"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        compiler_params=_TRITON, interpret=interpret,
    )(_ranges(ranges, "kv"), q, k, v, segments, segments))


def backward(q, k, v, segments, ranges, plan: BlockPlan, out, lse, d_out, *,
             scale: float, interpret) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv), each like its input, from the forward's output and logsumexp and the
    output cotangent d_out [B, H, S, D]: one kernel for dq (a program per query block), one
    for dk and dv (a program per key block)."""
    batch, heads, _, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k
    spec = _specs(plan, head_dim)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def tile(query, keys_, values, q_segment, k_segment, do, lse_rows, delta_rows, q_start,
             k_start):
        s, visible = tiles.scores(query, keys_, q_start, k_start, q_segment, k_segment,
                                  scale=scale, causal=plan.causal, window=plan.window)
        p = tiles.probabilities(s, visible, lse_rows[:, None])
        return p, tiles.score_gradient(p, do, values, delta_rows[:, None], scale)

    def dq_kernel(range_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                  dq_ref):
        q_start = pl.program_id(2) * bq
        query, q_segment, do = q_ref[...], qs_ref[...][:, None], do_ref[...]
        lse_rows, delta_rows = lse_ref[...], delta_ref[...]

        def visit(step, acc):
            keys = pl.ds(pl.multiple_of((range_ref[0] + step) * bk, bk), bk)
            key_tile = k_ref[keys, :]
            _, ds = tile(query, key_tile, v_ref[keys, :], q_segment, ks_ref[keys][None, :], do,
                         lse_rows, delta_rows, q_start, keys.start)
            return acc + tiles.dq_part(ds, key_tile)

        acc = lax.fori_loop(0, range_ref[1], visit, jnp.zeros((bq, head_dim), jnp.float32))
        dq_ref[...] = acc.astype(dq_ref.dtype)

    def dkv_kernel(range_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                   dk_ref, dv_ref):
        k_start = pl.program_id(2) * bk
        key_tile, values, k_segment = k_ref[...], v_ref[...], ks_ref[...][None, :]

        def visit(step, carry):
            rows = pl.ds(pl.multiple_of((range_ref[0] + step) * bq, bq), bq)
            query, do = q_ref[rows, :], do_ref[rows, :]
            p, ds = tile(query, key_tile, values, qs_ref[rows][:, None], k_segment, do,
                         lse_ref[rows], delta_ref[rows], rows.start, k_start)
            dk, dv = carry
            return dk + tiles.dk_part(ds, query), dv + tiles.dv_part(p, do)

        zeros = jnp.zeros((bk, head_dim), jnp.float32)
        dk, dv = lax.fori_loop(0, range_ref[1], visit, (zeros, zeros))
        dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)

    inputs = (q, k, v, segments, segments, d_out, lse, delta)
    dq = pl.pallas_call(
        dq_kernel, grid=(batch, heads, plan.num_q_blocks),
        in_specs=[spec["range"], spec["q_block"], spec["all"], spec["all"], spec["q_segment"],
                  spec["segment_all"], spec["q_block"], spec["row_block"], spec["row_block"]],
        out_specs=spec["q_block"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_TRITON, interpret=interpret,
    )(_ranges(ranges, "kv"), *inputs)
    dk, dv = pl.pallas_call(
        dkv_kernel, grid=(batch, heads, plan.num_k_blocks),
        in_specs=[spec["range"], spec["all"], spec["k_block"], spec["k_block"],
                  spec["segment_all"], spec["k_segment"], spec["all"], spec["row_all"],
                  spec["row_all"]],
        out_specs=[spec["k_block"], spec["k_block"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_TRITON, interpret=interpret,
    )(_ranges(ranges, "q"), *inputs)
    return dq, dk, dv
