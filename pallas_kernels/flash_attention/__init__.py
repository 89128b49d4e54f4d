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

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.mask import Window, is_visible, visibility_mask
from pallas_kernels.flash_attention.plan import BlockPlan, make_plan, visit_ranges
from pallas_kernels.flash_attention.reference import reference_attention
from pallas_kernels.partitioning import ShardedOver, attention_per_shard

BACKENDS = ("tpu", "gpu")

__all__ = ["BACKENDS", "BlockPlan", "Window", "flash_attention", "is_visible", "make_plan",
           "reference_attention", "visibility_mask", "visit_ranges"]


@dataclasses.dataclass(frozen=True)
class _Options:
    """What the kernels need besides the arrays (static)."""

    causal: bool
    window: Window | None
    scale: float
    block_q: int | None
    block_k: int | None
    backend: str | None
    interpret: Any


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
    interpret: Any = None,
    sharded_over: ShardedOver | None = None,
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, H, D] (fp32 or bf16), differentiable in q, k, v.

    causal: keys after the query are invisible. window (left, right): key j is visible from
    query i iff i - left <= j <= i + right (with causal, right is 0). segment_ids [B, S] int:
    a query sees only keys of its segment; 0 marks padding, whose outputs are zeros (no NaN,
    also for a row that is all padding). scale: 1/sqrt(D) by default. block_q / block_k:
    tiling (default: the backend's DEFAULT_BLOCKS for global or local layers). Any S:
    sequences are padded internally.

    backend "tpu" or "gpu" and interpret (bool, or `pltpu.InterpretParams` for the TPU
    kernels) are chosen for the platform the computation is lowered for when None: Mosaic on
    TPU, Triton on CUDA GPUs, the TPU kernels in interpret mode on CPU. So AOT compilation
    for a TPU topology from a CPU process gets the Mosaic kernels. `sharded_over`: under a
    sharded jit, the mesh axes that split batch and heads; each device then runs the kernels
    on its own shard (`partitioning`). None takes the enclosing `kernels_sharded_over` block's;
    without either, sharded inputs are gathered first.
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
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    options = _Options(causal, None if window is None else tuple(window),
                       q.shape[-1] ** -0.5 if scale is None else float(scale), block_q, block_k,
                       backend, interpret)
    for name in BACKENDS if backend is None else (backend,):  # bad blocks or window: fail now
        _plan(seq_len, options, name)
    attention = attention_per_shard(functools.partial(_attention, options=options),
                                    sharded_over)
    return attention(q, k, v, segment_ids.astype(jnp.int32))


def _plan(seq_len: int, options: _Options, backend: str) -> BlockPlan:
    defaults = _kernels(backend).DEFAULT_BLOCKS["global" if options.window is None else "local"]
    return make_plan(seq_len, causal=options.causal, window=options.window,
                     block_q=options.block_q or defaults[0],
                     block_k=options.block_k or defaults[1])


def _kernels(backend: str):
    return tpu if backend == "tpu" else gpu


def _on_platform(kernels: Callable, options: _Options, *args):
    """kernels(*args, plan, backend, interpret) with the backend and interpret mode that
    `options` fix, or else those of the platform being lowered for."""
    def branch(platform: str):
        backend = options.backend or ("gpu" if platform in ("cuda", "rocm") else "tpu")
        interpret = options.interpret if options.interpret is not None else platform == "cpu"
        plan = _plan(args[0].shape[1], options, backend)
        return lambda *arrays: kernels(*arrays, plan, options.scale, backend, interpret)

    if options.backend is not None and options.interpret is not None:
        return branch("any")(*args)  # nothing left to pick: trace one kernel, not four
    return lax.platform_dependent(*args, tpu=branch("tpu"), cuda=branch("cuda"),
                                  rocm=branch("rocm"), default=branch("cpu"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, options):
    return _forward(q, k, v, segment_ids, options)[0]


def _to_kernel_layout(x, plan: BlockPlan):
    """[B, S, H, D] -> [B, H, S', D], padded to the plan's length."""
    return jnp.pad(x, ((0, 0), (0, plan.seq_len - x.shape[1]), (0, 0), (0, 0))).swapaxes(1, 2)


def _forward_kernels(q, k, v, segment_ids, plan, scale, backend, interpret):
    """(output [B, S, H, D], logsumexp [B, H, S]) on one shard."""
    seq_len = q.shape[1]
    segments = jnp.pad(segment_ids, ((0, 0), (0, plan.seq_len - seq_len)))
    out, lse = _kernels(backend).forward(
        *(_to_kernel_layout(x, plan) for x in (q, k, v)), segments, visit_ranges(plan, segments),
        plan, scale=scale, interpret=interpret)
    return out.swapaxes(1, 2)[:, :seq_len], lse[:, :, :seq_len]


def _backward_kernels(q, k, v, segment_ids, out, lse, d_out, plan, scale, backend, interpret):
    """(dq, dk, dv), each [B, S, H, D], on one shard."""
    seq_len = q.shape[1]
    segments = jnp.pad(segment_ids, ((0, 0), (0, plan.seq_len - seq_len)))
    grads = _kernels(backend).backward(
        *(_to_kernel_layout(x, plan) for x in (q, k, v)), segments, visit_ranges(plan, segments),
        plan, _to_kernel_layout(out, plan),
        jnp.pad(lse, ((0, 0), (0, 0), (0, plan.seq_len - seq_len))),
        _to_kernel_layout(d_out, plan), scale=scale, interpret=interpret)
    return tuple(g.swapaxes(1, 2)[:, :seq_len] for g in grads)


def _forward(q, k, v, segment_ids, options):
    out, lse = _on_platform(_forward_kernels, options, q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, lse)


def _backward(options, residuals, d_out):
    dq, dk, dv = _on_platform(_backward_kernels, options, *residuals, d_out)
    return dq, dk, dv, None


_attention.defvjp(_forward, _backward)
