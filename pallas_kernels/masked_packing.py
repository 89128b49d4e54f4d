"""Masked-token packing for sparse MLM prediction: the selected rows of x [B, S, D] in one dense
[capacity, D] buffer, and the way back.

    packed = pack_masked_tokens(hidden, mask, capacity)       # values [capacity, D]
    logits = head(packed.values)                              # only valid slots count
    n_lost = overflow(packed, capacity)                       # the caller must check this
    dense = unpack_masked_tokens(packed.values, packed.indices, packed.valid, hidden.shape)

Slots follow the flat position b * S + s in ascending order. `capacity` is static; positions
past it are dropped from `values`, but `count` always holds the true number of selected positions,
so an overflow is never silent: `overflow(packed, capacity)` says how many were dropped, and the
caller decides (raise, log, or size capacity up with `capacity_for`, whose margin covers random
Bernoulli masking).

Design. Packing and unpacking are both a row move, out[m] = table[rows[m]] with rows[m] = -1
meaning a zero row: pack moves x's rows into slots (rows = source position of each slot, -1 for
unused slots), unpack moves slots back to positions (rows = slot of each position, -1 where
nothing was packed). The two index vectors are each other's inverse, so the VJP of one move is
the other move applied to the cotangent: the backward pass is a gather too, never a scatter-add.
The index arithmetic (cumsum, nonzero: O(B*S) integer work) stays in XLA; the rows move in one
Pallas kernel, used for both directions and both passes, with one body per backend:

  TPU (Mosaic; also the form interpret mode runs on CPU): the table stays in HBM; each grid
  step owns a block of output rows, reads their source indices from SMEM and issues one DMA
  per present row straight from HBM into VMEM, skipping absent rows, then writes the block with
  absent rows zeroed. Any table size works (only the output block lives in VMEM). Mosaic cannot
  address one row of a 16-bit tile (rows are packed in pairs), so 16- and 8-bit tables move as
  float32 (or int32): exact both ways, at the price of a 32-bit copy of the table, which XLA
  can fuse into the op that produces it.
  GPU (Triton): each program gathers a [rows, columns] tile with one vectorised indexed load.

Why by hand: `jnp.take` (XLA's gather) cannot know that the indices are distinct, so its
transpose is a scatter-add into the whole [B, S, D] table (sorting or atomics on accelerators).
Here the backward pass is the inverse gather in both impls (`impl="xla"` is the fallback and
the reference). The kernel adds what XLA's gather does not do: rows copied by DMA straight from
HBM, and absent rows (the majority of unpack's outputs) that cost no read at all.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

IMPLS = ("pallas", "xla")

# Output rows per TPU grid step: 128 row DMAs in flight at once hide their latency.
_TPU_BLOCK_ROWS = 128
# Triton tiles: powers of two, as Triton requires.
_GPU_BLOCK_ROWS = 64
_GPU_BLOCK_COLUMNS = 128


class PackedTokens(NamedTuple):
    """The selected rows of x in row-major order, as `pack_masked_tokens` returns them.

    values: [capacity, D] in x's dtype; slot i holds x at flat position indices[i] for the valid
      slots, zeros in the others. indices: [capacity] int32 flat positions b * S + s (0 in unused
      slots). valid: [capacity] bool, True for the first min(count, capacity) slots.
    count: [] int32, the number of selected positions; larger than capacity on overflow.
    """

    values: jax.Array
    indices: jax.Array
    valid: jax.Array
    count: jax.Array


def capacity_for(rows: int, seq_len: int, mask_ratio: float,
                 overflow_probability: float = 1e-12) -> int:
    """A static capacity for `rows` sequences of `seq_len` tokens of which a fraction `mask_ratio`
    is selected, by either masking of `data_pipelines.objectives`, clipped to [1, rows * seq_len]:

        ceil(n p + max(rows / 2, t)),   n = rows * seq_len, p = mask_ratio,
        t = L / 3 + sqrt(L^2 / 9 + 2 L n p (1 - p)),   L = ln(1 / overflow_probability).

    rows / 2 covers "exact" masking (round(p * eligible) per row is at most p * seq_len + 1/2).
    t covers "bernoulli" masking (every eligible token selected independently with probability
    p; at most n are eligible, and a binomial's tail grows with n): by Bernstein's inequality
    P(selected >= n p + t) <= overflow_probability, 1e-12 per microbatch by default. For large
    microbatches t is about sqrt(2 L) = 7.4 standard deviations (sqrt(n p (1 - p))) above the
    mean: 8 x 8192 tokens at p = 0.3 get 4.5% above the mean. The margin always covers the
    Bernoulli case, whatever the masking, so the train step need not know the mode. No capacity
    guarantees a given batch fits: check `overflow` on each batch.
    """
    rows, seq_len = operator.index(rows), operator.index(seq_len)
    if rows < 1 or seq_len < 1:
        raise ValueError(f"rows and seq_len must be positive, got {rows} and {seq_len}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    if not 0.0 < overflow_probability < 1.0:
        raise ValueError(f"overflow_probability must lie in (0, 1), got {overflow_probability}")
    total = rows * seq_len
    mean = total * mask_ratio
    log_inverse = math.log(1.0 / overflow_probability)
    tail = log_inverse / 3 + math.sqrt(log_inverse ** 2 / 9
                                       + 2 * log_inverse * mean * (1.0 - mask_ratio))
    margin = max(rows / 2, tail) if mask_ratio > 0.0 else 0.0  # p = 0 selects nothing
    return max(1, min(total, math.ceil(mean + margin)))


def pack_masked_tokens(
    x: jax.Array,
    mask: jax.Array,
    capacity: int,
    *,
    impl: str | None = None,
    interpret: bool | None = None,
) -> PackedTokens:
    """The rows of x [B, S, D] where mask [B, S] (bool, or 0/1) is set, packed into `capacity`
    slots.

    Slot i holds the i-th selected position in flat order b * S + s. If more than `capacity`
    positions are selected, the first `capacity` are packed and the rest are dropped from
    `values`, but `count` keeps the true number: the caller must check `overflow(packed,
    capacity)`. Differentiable in x (the VJP scatters the cotangent of the valid slots back to
    their positions, zeros elsewhere); jit-compatible. Rows are copied bit-exactly, in x's dtype
    (at most 32 bits wide for impl="pallas").

    capacity: a static Python int >= 1 (see `capacity_for`). impl: "pallas" (default) or "xla".
    interpret: run the Pallas kernel in interpret mode; None does so when lowering for CPU.
    The kernel body (Mosaic or Triton) follows the platform being lowered for.
    Returns `PackedTokens` (values in x's dtype).
    """
    capacity = _check_capacity(capacity)
    if x.ndim < 2 or mask.shape != x.shape[:-1]:
        raise ValueError(f"mask must have x's shape without its last axis: x {x.shape}, "
                         f"mask {mask.shape}")
    impl, interpret = _resolve(impl, interpret)
    positions = math.prod(mask.shape)
    flat_mask = mask.reshape(positions).astype(jnp.bool_)
    count = jnp.sum(flat_mask, dtype=jnp.int32)
    (indices,) = jnp.nonzero(flat_mask, size=capacity, fill_value=0)
    indices = indices.astype(jnp.int32)
    valid = jnp.arange(capacity, dtype=jnp.int32) < count
    slot = jnp.cumsum(flat_mask, dtype=jnp.int32) - 1
    slot_of_position = jnp.where(flat_mask & (slot < capacity), slot, -1)
    position_of_slot = jnp.where(valid, indices, -1)
    values = _move_rows(x.reshape(positions, x.shape[-1]), position_of_slot, slot_of_position,
                        impl, interpret)
    return PackedTokens(values, indices, valid, count)


def unpack_masked_tokens(
    packed_values: jax.Array,
    indices: jax.Array,
    valid: jax.Array,
    shape: Sequence[int],
    *,
    impl: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The transpose of packing: packed_values [capacity, D] put back at their flat positions.

    Returns an array of `shape` ([B, S, D], D = packed_values.shape[1]) in packed_values' dtype:
    position indices[i] holds packed_values[i] for every valid slot i, all other positions are
    zero. The valid slots' indices must be distinct (as `pack_masked_tokens` makes them); a valid
    slot whose index falls outside [0, B * S) is ignored. Differentiable in packed_values (the
    VJP gathers the cotangent at the valid slots' positions, zeros in the other slots).
    impl and interpret: as for `pack_masked_tokens`.
    """
    shape = tuple(operator.index(d) for d in shape)
    per_slot = (packed_values.shape[0],) if packed_values.ndim == 2 else None
    if per_slot is None or indices.shape != per_slot or valid.shape != per_slot:
        raise ValueError(f"expected packed_values [capacity, D] with indices and valid "
                         f"[capacity], got {packed_values.shape}, {indices.shape}, {valid.shape}")
    if len(shape) < 2 or shape[-1] != packed_values.shape[1]:
        raise ValueError(f"shape {shape} must end with packed_values' width "
                         f"{packed_values.shape[1]}")
    impl, interpret = _resolve(impl, interpret)
    positions, capacity = math.prod(shape[:-1]), packed_values.shape[0]
    indices = indices.astype(jnp.int32)
    present = valid.astype(jnp.bool_) & (indices >= 0) & (indices < positions)
    slots = jnp.arange(capacity, dtype=jnp.int32)
    slot_of_position = jnp.full((positions,), -1, jnp.int32).at[
        jnp.where(present, indices, positions)].set(slots, mode="drop")
    position_of_slot = jnp.where(present, indices, -1)
    out = _move_rows(packed_values, slot_of_position, position_of_slot, impl, interpret)
    return out.reshape(shape)


def overflow(packed: PackedTokens, capacity: int) -> jax.Array:
    """int32 [] number of selected positions that did not fit: max(count - capacity, 0).

    capacity must be the one `packed` was made with (its number of slots).
    """
    capacity = _check_capacity(capacity)
    if packed.values.shape[0] != capacity:
        raise ValueError(f"capacity {capacity} is not the packed buffer's "
                         f"{packed.values.shape[0]} slots")
    return jnp.maximum(packed.count - capacity, 0).astype(jnp.int32)


def _check_capacity(capacity: int) -> int:
    capacity = operator.index(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity}")
    return capacity


def _resolve(impl: str | None, interpret: bool | None) -> tuple[str, bool | None]:
    impl = "pallas" if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl, None if interpret is None else bool(interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _move_rows(table: jax.Array, rows: jax.Array, inverse_rows: jax.Array, impl: str,
               interpret: bool) -> jax.Array:
    """out[m] = table[rows[m]], zero where rows[m] == -1. Requires the present entries of rows
    to be distinct and inverse_rows [N] to be their inverse (inverse_rows[rows[m]] == m, -1 for
    table rows that are not moved), which makes the VJP the inverse move."""
    del inverse_rows
    return _gather_rows(table, rows, impl, interpret)


def _move_rows_fwd(table, rows, inverse_rows, impl, interpret):
    return _gather_rows(table, rows, impl, interpret), (rows, inverse_rows)


def _move_rows_bwd(impl, interpret, residuals, cotangent):
    rows, inverse_rows = residuals
    return _move_rows(cotangent, inverse_rows, rows, impl, interpret), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _gather_rows(table: jax.Array, rows: jax.Array, impl: str, interpret: bool) -> jax.Array:
    """[M, D] rows of table [N, D] at rows [M] int32, zero rows where rows is -1."""
    if impl == "xla":
        gathered = jnp.take(table, jnp.maximum(rows, 0), axis=0)
        return jnp.where(rows[:, None] >= 0, gathered, jnp.zeros((), table.dtype))
    if table.dtype.itemsize > 4:
        raise ValueError(f"the Pallas kernel moves dtypes of at most 32 bits, got {table.dtype}; "
                         f"use impl='xla'")

    def branch(body, platform: str):
        # interpret None: interpret mode exactly when lowering for CPU.
        return functools.partial(body, interpret=platform == "cpu" if interpret is None
                                 else interpret)

    # The kernel body follows the platform being lowered for (so AOT compilation for a TPU
    # from a CPU process gets the Mosaic kernel); the TPU body is the one interpreted on CPU.
    return lax.platform_dependent(
        table, rows, tpu=branch(_gather_rows_wide_tpu, "tpu"),
        cuda=branch(_gather_rows_gpu, "cuda"), rocm=branch(_gather_rows_gpu, "rocm"),
        default=branch(_gather_rows_wide_tpu, "cpu"))


def _gather_rows_wide_tpu(table: jax.Array, rows: jax.Array, *, interpret) -> jax.Array:
    """`_gather_rows_tpu` for any dtype of at most 32 bits. Mosaic cannot address a single row
    of a 16- or 8-bit tile (rows are packed in pairs or quads), so narrower values move as
    32-bit ones; the round trip through float32 / int32 is exact, and XLA can fuse the converts
    into the neighbouring ops."""
    wide = table.dtype
    if wide.itemsize < 4:
        wide = jnp.float32 if jnp.issubdtype(wide, jnp.floating) else jnp.int32
    return _gather_rows_tpu(table.astype(wide), rows, interpret=interpret).astype(table.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_rows(rows: jax.Array, block: int) -> jax.Array:
    return jnp.pad(rows, (0, _round_up(rows.shape[0], block) - rows.shape[0]), constant_values=-1)


def _tpu_kernel(rows_smem, rows_vmem, table_hbm, out_ref, buffer, semaphore):
    """One block of output rows: DMA each present row from HBM, then zero the absent ones."""

    def copy(i):
        return pltpu.make_async_copy(table_hbm.at[pl.ds(rows_smem[0, i], 1)],
                                     buffer.at[pl.ds(i, 1)], semaphore)

    # All copies share one semaphore: start every present row, then wait for each of them.
    @pl.loop(0, buffer.shape[0])
    def _start(i):
        @pl.when(rows_smem[0, i] >= 0)
        def _():
            copy(i).start()

    @pl.loop(0, buffer.shape[0])
    def _wait(i):
        @pl.when(rows_smem[0, i] >= 0)
        def _():
            copy(i).wait()

    # Absent rows were never written: the select discards whatever the buffer held there.
    out_ref[...] = jnp.where(rows_vmem[...] >= 0, buffer[...], jnp.zeros((), buffer.dtype))


def _gather_rows_tpu(table: jax.Array, rows: jax.Array, *, interpret: bool) -> jax.Array:
    """`_gather_rows` of a 32-bit table [N, D] with the Mosaic kernel (also run by interpret
    mode)."""
    m, width = rows.shape[0], table.shape[1]
    block = min(_TPU_BLOCK_ROWS, _round_up(m, 8))
    rows = _padded_rows(rows, block)
    steps = rows.shape[0] // block
    out = pl.pallas_call(
        _tpu_kernel,
        out_shape=jax.ShapeDtypeStruct((rows.shape[0], width), table.dtype),
        grid=(steps,),
        in_specs=[
            # The block's indices twice: as scalars (SMEM) to address the DMAs, and as a
            # vector (VMEM) for the select; [steps, 1, block] keeps the SMEM block 2-D.
            pl.BlockSpec((pl.squeezed, 1, block), lambda i: (i, 0, 0),
                         memory_space=pltpu.SMEM),
            pl.BlockSpec((block, 1), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((block, width), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((block, width), table.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(rows.reshape(steps, 1, block), rows[:, None], table)
    return out[:m]


def _gpu_kernel(rows_ref, table_ref, out_ref):
    """One [rows, columns] tile of the output: an indexed load of the table (kept in HBM)."""
    rows = rows_ref[...]
    block_columns = out_ref.shape[1]
    columns = pl.ds(pl.program_id(1) * block_columns, block_columns)
    # Absent rows load row 0 (a cache hit after the first) and are zeroed by the select.
    gathered = table_ref[jnp.maximum(rows, 0), columns]
    out_ref[...] = jnp.where(rows[:, None] >= 0, gathered, jnp.zeros((), gathered.dtype))


def _gather_rows_gpu(table: jax.Array, rows: jax.Array, *, interpret: bool) -> jax.Array:
    """`_gather_rows` of table [N, D] with the Triton kernel."""
    m, (n, width) = rows.shape[0], table.shape
    block_rows = min(_GPU_BLOCK_ROWS, pl.next_power_of_2(m))
    # The largest power of two dividing the width, so that tiles cover the row exactly.
    block_columns = min(_GPU_BLOCK_COLUMNS, width & -width)
    rows = _padded_rows(rows, block_rows)
    out = pl.pallas_call(
        _gpu_kernel,
        out_shape=jax.ShapeDtypeStruct((rows.shape[0], width), table.dtype),
        grid=(rows.shape[0] // block_rows, width // block_columns),
        in_specs=[pl.BlockSpec((block_rows,), lambda i, j: (i,)),
                  pl.BlockSpec((n, width), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((block_rows, block_columns), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(rows, table)
    return out[:m]
