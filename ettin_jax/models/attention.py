"""Attention in the model: which window each layer uses, and the switch between implementations.

Who may see whom (causal, window, packed segments, padding) is defined once, in
`pallas_kernels.flash_attention.mask`, and shared by every implementation:
  query i may attend key j iff segment_ids[i] == segment_ids[j] != 0, (decoder) j <= i, and
  (local layers) i - left <= j <= i + right. A padding query sees nothing; its output is zero.

Local windows follow HuggingFace so that exported models reproduce our logits:
  encoder (bidirectional): |i - j| <= local_attention // 2          -> (w, w),     w = L // 2
  decoder (causal):        the w most recent keys, itself included  -> (w - 1, 0)
Ettin's flash-attn training used (w, 0) for the decoder, one key more; we pick HF's.

Implementations (`ModelConfig.attention_impl`): "xla" (dense, `reference_attention`), "pallas"
(our flash-attention kernels, `pallas_kernels.flash_attention`), "splash" (JAX's TPU splash
kernels, `pallas_kernels.splash`), "cudnn" (jax.nn.dot_product_attention on a CUDA GPU), and
"auto": the implementation of `AUTO` for the platform the step is lowered for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ettin_jax.errors import did_you_mean
from pallas_kernels.flash_attention import (
    Window,
    flash_attention,
    is_visible,
    reference_attention,
    visibility_mask,
)
from pallas_kernels.flash_attention.reference import masked_attention
from pallas_kernels.splash import splash_attention

IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas", "cudnn", "splash", "auto")

# What "auto" runs on each platform the step may be lowered for (the one home of this choice):
#   tpu:  our Pallas kernels (Mosaic), by the evidence of docs/benchmarks.md ("Attention
#         kernels compiled for TPU v5p"): ours and splash both compile to three Mosaic calls
#         in O(S) memory (temporaries 216 MiB against splash's 169-245 MiB per 8192-token
#         call at Ettin-150m's heads) and compute the same blocks on global, causal and local
#         layers, but on packed rows, which every Ettin phase trains on, ours skip the block
#         pairs whose documents do not meet: at S = 8192, 1.23x the visible score entries
#         against splash's 2.81x (splash skips by the static band only). Neither kernel has
#         been timed on a TPU here (cost_analysis counts no FLOPs inside Mosaic calls).
#   cuda, rocm: our Pallas kernels (Triton); splash is TPU-only, and cuDNN cannot skip
#         blocks for packed segments or a bidirectional window.
#   anything else (cpu): dense XLA; the kernels would run in interpret mode, far slower.
AUTO: dict[str, str] = {"tpu": "pallas", "cuda": "pallas", "rocm": "pallas", "default": "xla"}

__all__ = ["AUTO", "IMPLEMENTATIONS", "Window", "cached_attention", "dot_product_attention",
           "local_window", "visibility_mask"]


def local_window(local_attention: int, *, causal: bool) -> Window:
    """(left, right) inclusive key offsets of a local layer with full window `local_attention`."""
    half = local_attention // 2
    return (half - 1, 0) if causal else (half, half)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    causal: bool,
    window: Window | None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention of q, k, v [B, S, heads, head_dim] under the mask semantics above.

    `segment_ids` [B, S] int (1..n documents, 0 padding). Scale 1/sqrt(head_dim); softmax in
    fp32. Returns [B, S, heads, head_dim] in v's dtype, zero at padding queries.
    `impl`: "xla" (dense reference, runs everywhere), "pallas" (the flash-attention kernels of
    `pallas_kernels`; interpret mode on CPU), "splash" (JAX's TPU splash kernels; interpret
    mode on CPU, none on GPU), "cudnn" (jax.nn.dot_product_attention on a CUDA GPU), "auto"
    (`AUTO`'s choice for the platform the step is lowered for, picked at lowering time by
    `lax.platform_dependent`, so an AOT compile for a TPU from a CPU process gets the TPU
    kernel; on CPU it is "xla", bit for bit). Under a sharded step the Pallas and splash
    kernels run per shard of the mesh the step names
    (`pallas_kernels.partitioning.kernels_sharded_over`); XLA partitions the others itself.
    """
    mask = dict(causal=causal, window=window, segment_ids=segment_ids)
    if impl == "xla":
        return reference_attention(q, k, v, **mask)
    if impl == "pallas":
        return flash_attention(q, k, v, **mask)
    if impl == "splash":
        return splash_attention(q, k, v, **mask)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids, causal=causal, window=window)
    if impl == "auto":
        return _auto_attention(q, k, v, **mask)
    raise ValueError(
        f"unknown attention implementation {impl!r}.{did_you_mean(impl, IMPLEMENTATIONS)} "
        f"Valid: {', '.join(IMPLEMENTATIONS)}"
    )


def cached_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    start: jax.Array | int,
    *,
    window: Window | None,
) -> jax.Array:
    """Causal attention of new queries over a key/value cache (incremental decoding).

    q [B, T, heads, head_dim] holds the queries of positions start .. start+T-1 of one
    document (no padding); keys, values [B, M, heads, head_dim] hold that document's keys and
    values at positions 0 .. start+T-1 (later slots are never read). Visibility is the
    decoder's `is_visible` (causal, `window` on local layers), numerics those of the "xla"
    implementation. Returns [B, T, heads, head_dim] in values' dtype.
    """
    query_index = start + jnp.arange(q.shape[1], dtype=jnp.int32)
    key_index = jnp.arange(keys.shape[1], dtype=jnp.int32)
    one_document = jnp.ones((), jnp.int32)
    mask = is_visible(query_index[:, None], key_index[None, :], one_document, one_document,
                      causal=True, window=window)
    return masked_attention(q, keys, values, mask)


def _auto_attention(q, k, v, **mask):
    """`AUTO`'s implementation for the platform being lowered for. Each branch is the kernel
    compiled for that platform (not interpret mode), so only one is traced per platform."""
    kernels = {
        "xla": functools.partial(reference_attention, **mask),
        # `flash_attention` otherwise traces its TPU and GPU kernels for every platform.
        "pallas:tpu": functools.partial(flash_attention, backend="tpu", interpret=False, **mask),
        "pallas:gpu": functools.partial(flash_attention, backend="gpu", interpret=False, **mask),
        "splash:tpu": functools.partial(splash_attention, interpret=False, **mask),
    }

    def kernel(platform: str):
        choice = AUTO[platform]
        if choice == "pallas":
            return kernels["pallas:tpu" if platform == "tpu" else "pallas:gpu"]
        return kernels["splash:tpu" if choice == "splash" else "xla"]

    return lax.platform_dependent(q, k, v, tpu=kernel("tpu"), cuda=kernel("cuda"),
                                  rocm=kernel("rocm"), default=kernel("default"))


def _cudnn_attention(q, k, v, segment_ids, *, causal, window):
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a CUDA GPU, but JAX runs on "
            f"{jax.default_backend()!r}; use attention_impl='xla' (or 'pallas')"
        )
    # cuDNN natively skips the causal triangle and a left window; segments and a bidirectional
    # window are passed as an explicit mask, which it also supports (without block skipping).
    native_window = window if causal else None
    mask = visibility_mask(segment_ids, causal=False, window=None if causal else window)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, local_window_size=native_window,
        implementation="cudnn",
    )
    query_is_real = (segment_ids != 0)[:, :, None, None]
    return jax.numpy.where(query_is_real, out, 0)
