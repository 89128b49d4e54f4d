"""Flash attention kernels for TPU (Mosaic): the key loop is the innermost grid axis.

Each grid step sees one query block and one key block in VMEM; running statistics live in VMEM
scratch across the "arbitrary" key axis. The visited block ranges (`plan.visit_ranges`) are
scalar-prefetched into SMEM: the index maps read them to fetch only visited blocks, and a step
past a block's count repeats the previous block index (so no copy is issued) and computes
nothing. Layouts: q, k, v, o [B, H, S, D]; per-row statistics [B, H, S, 1] inside (logsumexp
[B, H, S] outside, as the GPU kernels have it); query segment ids
[B, S, 1] and key segment ids [B, 1, S], so that tiles broadcast to [bq, bk] without a
transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention.plan import BlockPlan

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")

# (block_q, block_k): large blocks keep grid steps few on global layers; local layers take
# blocks near the window, so that little outside the band is computed.
DEFAULT_BLOCKS = {"global": (512, 512), "local": (128, 128)}


def _visited(first_ref, count_ref, b, block, step):
    """The block index visited at `step`: clamped to the last visited one past the count."""
    return first_ref[b, block] + jnp.minimum(step, jnp.maximum(count_ref[b, block] - 1, 0))


def _specs(plan: BlockPlan, head_dim: int, *, outer_is_query: bool) -> dict[str, pl.BlockSpec]:
    """BlockSpecs of the tensors for a grid (b, h, outer block, step) whose outer axis runs over
    query blocks (forward, dq) or key blocks (dk/dv), and whose step walks the visited blocks
    of the other side."""
    def query_block(b, outer, step, first, count):
        return outer if outer_is_query else _visited(first, count, b, outer, step)

    def key_block(b, outer, step, first, count):
        return _visited(first, count, b, outer, step) if outer_is_query else outer

    bq, bk, sq = plan.block_q, plan.block_k, pl.squeezed
    return {
        "q": pl.BlockSpec((sq, sq, bq, head_dim),
                          lambda b, h, o, s, f, c: (b, h, query_block(b, o, s, f, c), 0)),
        "k": pl.BlockSpec((sq, sq, bk, head_dim),
                          lambda b, h, o, s, f, c: (b, h, key_block(b, o, s, f, c), 0)),
        "row": pl.BlockSpec((sq, sq, bq, 1),
                            lambda b, h, o, s, f, c: (b, h, query_block(b, o, s, f, c), 0)),
        "q_segment": pl.BlockSpec((sq, bq, 1),
                                  lambda b, h, o, s, f, c: (b, query_block(b, o, s, f, c), 0)),
        "k_segment": pl.BlockSpec((sq, 1, bk),
                                  lambda b, h, o, s, f, c: (b, 0, key_block(b, o, s, f, c))),
    }


def _call(kernel, plan: BlockPlan, grid, in_specs, out_specs, out_shape, scratch, interpret):
    return pl.pallas_call(
        kernel,
        name=f"ettin_flash_attention_{kernel.__name__.removesuffix('_kernel')}",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
    )


def forward(q, k, v, segments, ranges, plan: BlockPlan, *, scale: float,
            interpret) -> tuple[jax.Array, jax.Array]:
    """(output [B, H, S, D] in q's dtype, logsumexp [B, H, S] fp32) of q, k, v [B, H, S, D]
    with segment ids [B, S] and the visit ranges of `plan.visit_ranges`."""
    batch, heads, _, head_dim = q.shape
    q_segment, k_segment = segments[:, :, None], segments[:, None, :]
    spec = _specs(plan, head_dim, outer_is_query=True)

    def fwd_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref,
                   m_ref, l_ref, acc_ref):
        b, qb, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when(step == 0)
        def _():
            m_ref[...], l_ref[...], acc_ref[...] = tiles.initial_state(plan.block_q, head_dim)

        @pl.when(step < count_ref[b, qb])
        def _():
            kb = first_ref[b, qb] + step
            s, visible = tiles.scores(q_ref[...], k_ref[...], qb * plan.block_q,
                                      kb * plan.block_k, qs_ref[...], ks_ref[...], scale=scale,
                                      causal=plan.causal, window=plan.window)
            m_ref[...], l_ref[...], acc_ref[...] = tiles.online_softmax(
                m_ref[...], l_ref[...], acc_ref[...], s, visible, v_ref[...])

        @pl.when(step == pl.num_programs(3) - 1)
        def _():
            out, lse = tiles.finish(m_ref[...], l_ref[...], acc_ref[...])
            o_ref[...], lse_ref[...] = out.astype(o_ref.dtype), lse

    call = _call(
        fwd_kernel, plan, (batch, heads, plan.num_q_blocks, plan.kv_steps),
        [spec["q"], spec["k"], spec["k"], spec["q_segment"], spec["k_segment"]],
        [spec["q"], spec["row"]],
        [jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)],
        [pltpu.VMEM((plan.block_q, 1), jnp.float32), pltpu.VMEM((plan.block_q, 1), jnp.float32),
         pltpu.VMEM((plan.block_q, head_dim), jnp.float32)],
        interpret)
    out, lse = call(ranges["kv_first"], ranges["kv_count"], q, k, v, q_segment, k_segment)
    return out, lse[..., 0]


def backward(q, k, v, segments, ranges, plan: BlockPlan, out, lse, d_out, *,
             scale: float, interpret) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv), each like its input, from the forward's output and logsumexp and the
    output cotangent d_out [B, H, S, D]: one kernel for dq (query blocks outer), one for dk
    and dv (key blocks outer)."""
    batch, heads, _, head_dim = q.shape
    q_segment, k_segment = segments[:, :, None], segments[:, None, :]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                    keepdims=True)
    lse = lse[..., None]
    common = functools.partial(_tile_gradients, plan=plan, scale=scale)

    def dq_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref,
                  delta_ref, dq_ref, acc_ref):
        b, qb, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when(step == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(step < count_ref[b, qb])
        def _():
            kb = first_ref[b, qb] + step
            _, ds = common(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                           qb, kb)
            acc_ref[...] += tiles.dq_part(ds, k_ref[...])

        @pl.when(step == pl.num_programs(3) - 1)
        def _():
            dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)

    def dkv_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref,
                   delta_ref, dk_ref, dv_ref, dk_acc, dv_acc):
        b, kb, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when(step == 0)
        def _():
            dk_acc[...], dv_acc[...] = jnp.zeros_like(dk_acc), jnp.zeros_like(dv_acc)

        @pl.when(step < count_ref[b, kb])
        def _():
            qb = first_ref[b, kb] + step
            p, ds = common(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                           qb, kb)
            dk_acc[...] += tiles.dk_part(ds, q_ref[...])
            dv_acc[...] += tiles.dv_part(p, do_ref[...])

        @pl.when(step == pl.num_programs(3) - 1)
        def _():
            dk_ref[...], dv_ref[...] = dk_acc[...].astype(dk_ref.dtype), \
                dv_acc[...].astype(dv_ref.dtype)

    inputs = (q, k, v, q_segment, k_segment, d_out, lse, delta)
    by_query = _specs(plan, head_dim, outer_is_query=True)
    dq = _call(
        dq_kernel, plan, (batch, heads, plan.num_q_blocks, plan.kv_steps),
        [by_query[name] for name in ("q", "k", "k", "q_segment", "k_segment", "q", "row",
                                     "row")],
        by_query["q"], jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((plan.block_q, head_dim), jnp.float32)], interpret,
    )(ranges["kv_first"], ranges["kv_count"], *inputs)
    by_key = _specs(plan, head_dim, outer_is_query=False)
    dk, dv = _call(
        dkv_kernel, plan, (batch, heads, plan.num_k_blocks, plan.q_steps),
        [by_key[name] for name in ("q", "k", "k", "q_segment", "k_segment", "q", "row", "row")],
        [by_key["k"], by_key["k"]],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((plan.block_k, head_dim), jnp.float32),
         pltpu.VMEM((plan.block_k, head_dim), jnp.float32)], interpret,
    )(ranges["q_first"], ranges["q_count"], *inputs)
    return dq, dk, dv


def _tile_gradients(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, qb, kb, *,
                    plan: BlockPlan, scale: float):
    """(probabilities, score gradient) of the tile (query block qb, key block kb)."""
    s, visible = tiles.scores(q_ref[...], k_ref[...], qb * plan.block_q, kb * plan.block_k,
                              qs_ref[...], ks_ref[...], scale=scale, causal=plan.causal,
                              window=plan.window)
    p = tiles.probabilities(s, visible, lse_ref[...])
    return p, tiles.score_gradient(p, do_ref[...], v_ref[...], delta_ref[...], scale)
