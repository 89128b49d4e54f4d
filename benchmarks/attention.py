"""Attention at Ettin shapes: forward + backward time and useful TFLOP/s of our flash-attention
kernels, the dense XLA reference and jax.nn.dot_product_attention (cuDNN where it can express
the mask), side by side in one run.

    .venv/bin/python benchmarks/attention.py                 # on a GPU or TPU: the timing table
    .venv/bin/python benchmarks/attention.py --seq 256 512   # shorter sequences

Cases (H = 12 heads, D = 64, bf16): global bidirectional, global causal, local window 128
(bidirectional |i - j| <= 64, the encoder's local layers), and packed segments (documents of
random lengths in each row, bidirectional). Useful FLOPs count only visible (query, key)
pairs: 4 * pairs * D per head forward, 2.5x that backward. On a CPU the kernels only run in
interpret mode, so there the script checks values against the reference instead of timing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import flash_attention, reference_attention, visibility_mask
from provenance import print_provenance

HEADS, HEAD_DIM = 12, 64
CASES = {  # name: (causal, window, packed)
    "global bidirectional": (False, None, False),
    "global causal": (True, None, False),
    "local window 128": (False, (64, 64), False),
    "packed segments": (False, None, True),
}


def _segments(rng: np.random.Generator, batch: int, seq: int, packed: bool) -> np.ndarray:
    if not packed:
        return np.ones((batch, seq), np.int32)
    rows = []
    for _ in range(batch):
        lengths = rng.integers(seq // 16, seq // 2, size=seq)
        starts = np.cumsum(lengths)
        rows.append(np.searchsorted(starts, np.arange(seq), side="right") + 1)
    return np.stack(rows).astype(np.int32)


def _cudnn(causal, window, packed):
    """jax.nn.dot_product_attention with cuDNN, or None where cuDNN cannot express the mask
    (packed segments; a bidirectional window)."""
    if packed or (window is not None and not causal):
        return None
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="cudnn")


def _median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fwd_bwd(attention):
    """jit(value and gradients of sum(attention(q, k, v) * cotangent))."""
    def loss(q, k, v, cotangent):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seq per call")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print_provenance(f"backend {jax.default_backend()}")
    timing = jax.default_backend() != "cpu"
    rng = np.random.default_rng(0)
    if timing:
        print("| seq | case | ours ms | ours TFLOP/s | XLA ms | cuDNN ms | ours / XLA speed | "
              "ours / cuDNN speed |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("CPU: interpret mode, values only (max |ours - reference| / max |reference|)")
        print()
        print("| seq | case | forward (loss) | dq | dk | dv |")
        print("|---|---|---|---|---|---|")
    for seq in args.seq:
        batch = max(1, args.tokens // seq)
        q, k, v, cotangent = (jnp.asarray(rng.normal(size=(batch, seq, HEADS, HEAD_DIM)),
                                          jnp.bfloat16 if timing else jnp.float32)
                              for _ in range(4))
        for name, (causal, window, packed) in CASES.items():
            segments = jnp.asarray(_segments(rng, batch, seq, packed))
            mask = dict(causal=causal, window=window, segment_ids=segments)
            ours = _fwd_bwd(functools.partial(flash_attention, **mask))
            xla = _fwd_bwd(functools.partial(reference_attention, **mask))
            if not timing:
                (value, grads), (ref_value, ref_grads) = (f(q, k, v, cotangent)
                                                          for f in (ours, xla))
                errors = [abs(float(value - ref_value)) / abs(float(ref_value))]
                errors += [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                           for a, b in zip(grads, ref_grads)]
                print(f"| {seq} | {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
                continue
            pairs = float(jnp.sum(visibility_mask(segments, causal=causal, window=window)))
            flops = 3.5 * 4 * pairs * HEAD_DIM * HEADS
            ours_s = _median_seconds(ours, (q, k, v, cotangent), args.repeats)
            xla_s = _median_seconds(xla, (q, k, v, cotangent), args.repeats)
            cudnn = _cudnn(causal, window, packed) if jax.default_backend() == "gpu" else None
            cudnn_s = (_median_seconds(_fwd_bwd(cudnn), (q, k, v, cotangent), args.repeats)
                       if cudnn else None)
            print(f"| {seq} | {name} | {ours_s * 1e3:.2f} | {flops / ours_s / 1e12:.1f} | "
                  f"{xla_s * 1e3:.2f} | {'n/a' if cudnn_s is None else f'{cudnn_s * 1e3:.2f}'} "
                  f"| {xla_s / ours_s:.2f}x | "
                  f"{'n/a' if cudnn_s is None else f'{cudnn_s / ours_s:.2f}x'} |", flush=True)


if __name__ == "__main__":
    main()
