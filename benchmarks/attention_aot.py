"""Attention kernels compiled for a TPU v5p chip, without a TPU: forward + backward of one
attention layer at Ettin-150m's head shapes, by our Pallas kernels, JAX's splash attention and
dense XLA, with what the compiled executables and the kernels' own block plans say.

    .venv/bin/python benchmarks/attention_aot.py               # S = 1024 and 8192, v5p:2x2x1
    .venv/bin/python benchmarks/attention_aot.py --seq 1024    # one length

Per case: `compiled.cost_analysis()` FLOPs (XLA's count; it cannot see inside a Mosaic custom
call, whose FLOPs it reports as 0), `compiled.memory_analysis()` temporary, argument and output
bytes, the Mosaic custom calls in the executable, and, for the kernels, the score entries they
compute in the forward pass: visited (query block, key block) pairs times the block area, from
our kernels' plan (`make_plan`, `visit_ranges`: band and segments) and splash's mask info
(band only). Useful entries are the visible (query, key) pairs. No timings: there is no TPU.

Shapes: 12 heads x 64, bf16, 8192 tokens per call (8 rows of 1024, 1 row of 8192; one v5p
chip's share). Cases: global bidirectional, global causal, local window 128 (encoder (64, 64)
and decoder (63, 0)), packed segments (documents of 1/16 to 1/2 of the row, bidirectional).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from attention import _segments  # noqa: E402
from ettin_jax.training.aot import topology_devices  # noqa: E402
from pallas_kernels import splash  # noqa: E402
from pallas_kernels.flash_attention import (  # noqa: E402
    flash_attention,
    make_plan,
    reference_attention,
    tpu,
    visibility_mask,
    visit_ranges,
)
from provenance import print_provenance  # noqa: E402

HEADS, HEAD_DIM, TOKENS = 12, 64, 8192
CASES = {  # name: (causal, window, packed)
    "global": (False, None, False),
    "causal": (True, None, False),
    "local 128 (64, 64)": (False, (64, 64), False),
    "local 128 causal (63, 0)": (True, (63, 0), False),
    "packed segments": (False, None, True),
}
IMPLS = {"pallas": flash_attention, "splash": splash.splash_attention, "xla": reference_attention}
MIB = 2**20


def compiled_fwd_bwd(attention, batch: int, seq: int, device, **mask) -> jax.stages.Compiled:
    """jit(value and gradients in q, k, v of sum(attention(q, k, v) * cotangent)) compiled for
    `device`'s platform, on abstract bf16 [batch, seq, 12, 64] inputs and int32 segment ids."""
    def loss(q, k, v, cotangent, segment_ids):
        out = attention(q, k, v, segment_ids=segment_ids, **mask)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    on_chip = SingleDeviceSharding(device)
    arrays = [jax.ShapeDtypeStruct((batch, seq, HEADS, HEAD_DIM), jnp.bfloat16, sharding=on_chip)
              for _ in range(4)]
    segments = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=on_chip)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
        *arrays, segments).lower().compile()


def computed_entries(impl: str, segments: np.ndarray, causal: bool, window) -> int | None:
    """Score entries the kernel computes in the forward pass over all rows (per head):
    visited block pairs x block area, from the kernel's own plan. None for XLA (dense: S^2)."""
    seq = segments.shape[1]
    if impl == "pallas":
        blocks = tpu.DEFAULT_BLOCKS["global" if window is None else "local"]
        plan = make_plan(seq, causal=causal, window=window, block_q=blocks[0], block_k=blocks[1])
        padded = np.pad(segments, ((0, 0), (0, plan.seq_len - seq)))
        count = visit_ranges(plan, jnp.asarray(padded))["kv_count"]
        return int(np.sum(count)) * plan.block_q * plan.block_k
    if impl == "splash":
        block = splash.block_size(seq, local=window is not None)
        length = -(-seq // block) * block
        mask = splash.make_mask(length, 1, causal=causal, window=window)
        info, _ = splash_attention_mask_info.process_mask(mask, (block, block))
        visited = int(np.sum(np.asarray(info.block_mask) > 0))
        return visited * block * block * segments.shape[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--topology", default="v5p:2x2x1")
    args = parser.parse_args()
    device = topology_devices(args.topology)[0]
    print_provenance(f"topology {args.topology} (one chip); {HEADS} heads x {HEAD_DIM}, bf16, "
                     f"{TOKENS} tokens per call")
    print("| S x rows | case | kernel | cost_analysis GFLOP | Mosaic calls | temp MiB | "
          "argument MiB | output MiB | computed / useful score entries | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for seq in args.seq:
        batch = max(1, TOKENS // seq)
        for name, (causal, window, packed) in CASES.items():
            segments = _segments(rng, batch, seq, packed)
            useful = int(np.sum(np.asarray(
                visibility_mask(jnp.asarray(segments), causal=causal, window=window))))
            for impl, attention in IMPLS.items():
                start = time.perf_counter()
                compiled = compiled_fwd_bwd(functools.partial(attention, causal=causal,
                                                              window=window),
                                            batch, seq, device)
                seconds = time.perf_counter() - start
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                memory = compiled.memory_analysis()
                calls = compiled.as_text().count("tpu_custom_call")
                entries = computed_entries(impl, segments, causal, window)
                ratio = "dense" if entries is None else f"{entries / useful:.2f}"
                print(f"| {seq} x {batch} | {name} | {impl} | {cost.get('flops', 0) / 1e9:.1f} "
                      f"| {calls} | {memory.temp_size_in_bytes / MIB:.1f} "
                      f"| {memory.argument_size_in_bytes / MIB:.1f} "
                      f"| {memory.output_size_in_bytes / MIB:.1f} | {ratio} | {seconds:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
