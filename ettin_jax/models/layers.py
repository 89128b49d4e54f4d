"""Building blocks of the Ettin transformer (NNX modules).

Every parameter carries logical axis names; the trainer's rules table maps them to mesh axes:
  vocab   rows of the token embedding / tied decoder, and the decoder bias
  embed   the residual stream (hidden_size)
  heads   attention features (num_heads * head_dim) of Q, K, V and the output projection
  qkv     the Q/K/V slot of the fused projection (size 3; never sharded)
  mlp     feed-forward features: the GLU intermediate and the prediction head's dense output
  glu     the input/gate slot of the GLU projection (size 2; never sharded)
  norm    LayerNorm scales (never sharded)
Parameters are created with eager sharding off: placement is the trainer's job.

Numerics (`ModelConfig.precision`): the projections (`_dense`, `_fused`) always compute in
config.dtype; the embedding output, the LayerNorms and the residual adds use
`config.stream_dtype`, which is config.dtype under "uniform" and float32 under "autocast"
(PyTorch autocast: a `dtype` branch output added to the float32 residual stream gives float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ettin_jax.models.attention import cached_attention, dot_product_attention, local_window
from ettin_jax.models.config import ModelConfig
from ettin_jax.models.rope import apply_rope, rope_tables

RopeTables = dict[str, tuple[jax.Array, jax.Array]]
Extra = TypeVar("Extra")


def rope_by_kind(config: ModelConfig, positions: jax.Array) -> RopeTables:
    """RoPE tables for positions [B, S] of both layer kinds: "global" from global_rope_theta,
    "local" from local_rope_theta (each layer picks its kind's)."""
    return {
        "global": rope_tables(positions, config.head_dim, config.global_rope_theta),
        "local": rope_tables(positions, config.head_dim, config.local_rope_theta),
    }


def _logical(init: Callable, *axes: str | None) -> Callable:
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def truncated_normal(std: float) -> Callable:
    """Megatron initializer: normal(0, std) truncated at 2 std."""
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


def output_std(config: ModelConfig) -> float:
    """Init std of the residual output projections (attention Wo, MLP Wo): std / sqrt(2L)."""
    return config.init_std / math.sqrt(2.0 * config.num_layers)


def layer_norm(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """Scale-only LayerNorm over hidden_size, eps from config; statistics in float32 (at
    least), input, scale and output in config.stream_dtype."""
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.norm_eps,
        use_bias=False,
        scale_init=_logical(nnx.initializers.ones, "norm"),
        dtype=config.stream_dtype,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )


def _dense(n_in: int, n_out: int, std: float, axes: tuple[str, str], config: ModelConfig,
           rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, use_bias=False, kernel_init=_logical(truncated_normal(std), *axes),
        dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
    )


def _fused(n_in: int, slots: int, n_out: int, axes: tuple[str, str, str], config: ModelConfig,
           rngs: nnx.Rngs) -> nnx.Einsum:
    """A bias-free projection [.., n_in] -> [.., slots, n_out] (fused Q/K/V or GLU halves)."""
    return nnx.Einsum(
        "...i,isf->...sf", (n_in, slots, n_out),
        kernel_init=_logical(truncated_normal(config.init_std), *axes),
        dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
    )


class Embeddings(nnx.Module):
    """Token embedding followed by a LayerNorm (no position embeddings: RoPE does that); the
    output is in config.stream_dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.tok_embeddings = nnx.Embed(
            config.vocab_size, config.hidden_size,
            embedding_init=_logical(truncated_normal(config.init_std), "vocab", "embed"),
            dtype=config.stream_dtype, param_dtype=config.param_dtype, rngs=rngs,
        )
        self.norm = layer_norm(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.norm(self.tok_embeddings(input_ids))


class Attention(nnx.Module):
    """Fused-QKV self-attention with RoPE; global or local (windowed) by layer index."""

    def __init__(self, config: ModelConfig, layer: int, *, causal: bool, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.causal = causal
        self.kind = "global" if config.is_global_layer(layer) else "local"
        self.window = (
            None if self.kind == "global" else local_window(config.local_attention, causal=causal)
        )
        self.impl = config.attention_impl
        hidden = config.hidden_size
        self.Wqkv = _fused(hidden, 3, hidden, ("embed", "qkv", "heads"), config, rngs)
        self.Wo = _dense(hidden, hidden, output_std(config), ("heads", "embed"), config, rngs)
        self.out_drop = nnx.Dropout(config.attention_output_dropout)

    def __call__(self, x: jax.Array, rope: RopeTables, segment_ids: jax.Array, *,
                 deterministic: bool, dropout_rng: jax.Array | None) -> jax.Array:
        q, k, v = self._project(x, rope)
        out = dot_product_attention(
            q, k, v, segment_ids, causal=self.causal, window=self.window, impl=self.impl,
        )
        return self.out_drop(self._output(out), deterministic=deterministic, rngs=dropout_rng)

    def decode(self, x: jax.Array, rope: RopeTables, keys: jax.Array, values: jax.Array,
               start: jax.Array | int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`__call__` (deterministic) for new tokens of one causal document, with a KV cache.

        x [B, T, hidden] are the tokens at positions start .. start+T-1, `rope` their tables;
        keys, values [B, M, heads, head_dim] hold the document's earlier positions. Returns the
        output [B, T, hidden] and the buffers with this step's keys and values written at
        start .. start+T-1. Raises ValueError for a bidirectional (encoder) layer.
        """
        if not self.causal:
            raise ValueError("cached decoding needs a causal (decoder) attention layer")
        q, k, v = self._project(x, rope)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), start, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), start, axis=1)
        out = cached_attention(q, keys, values, start, window=self.window)
        return self._output(out), (keys, values)

    def _project(self, x: jax.Array, rope: RopeTables) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k (rotated by this layer's kind of RoPE) and v, each [B, S, heads, head_dim]."""
        batch, seq, _ = x.shape
        qkv = self.Wqkv(x).reshape(batch, seq, 3, self.num_heads, self.head_dim)
        cos, sin = rope[self.kind]
        return apply_rope(qkv[:, :, 0], cos, sin), apply_rope(qkv[:, :, 1], cos, sin), qkv[:, :, 2]

    def _output(self, heads: jax.Array) -> jax.Array:
        """Wo of the attention output [B, S, heads, head_dim] -> [B, S, hidden]."""
        return self.Wo(heads.reshape(heads.shape[:2] + (self.num_heads * self.head_dim,)))


class GeGLU(nnx.Module):
    """Wo(gelu(x_in) * x_gate) with exact (erf) GELU; Wi's first half is x_in, second the gate."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.Wi = _fused(
            config.hidden_size, 2, config.intermediate_size, ("embed", "glu", "mlp"), config, rngs
        )
        self.Wo = _dense(
            config.intermediate_size, config.hidden_size, output_std(config), ("mlp", "embed"),
            config, rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        projected = self.Wi(x)
        return self.Wo(jax.nn.gelu(projected[..., 0, :], approximate=False) * projected[..., 1, :])


class TransformerBlock(nnx.Module):
    """Pre-norm block: h += attn(attn_norm(h)); h += mlp(mlp_norm(h)). Layer 0 has no attn_norm."""

    def __init__(self, config: ModelConfig, layer: int, *, causal: bool, rngs: nnx.Rngs):
        self.attn_norm = layer_norm(config, rngs=rngs) if layer != 0 else None
        self.attn = Attention(config, layer, causal=causal, rngs=rngs)
        self.mlp_norm = layer_norm(config, rngs=rngs)
        self.mlp = GeGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, rope: RopeTables, segment_ids: jax.Array, *,
                 deterministic: bool, dropout_rng: jax.Array | None) -> jax.Array:
        out, _ = self.with_attention(x, lambda h: (self.attn(
            h, rope, segment_ids, deterministic=deterministic, dropout_rng=dropout_rng), None))
        return out

    def with_attention(
        self, x: jax.Array, attend: Callable[[jax.Array], tuple[jax.Array, Extra]]
    ) -> tuple[jax.Array, Extra]:
        """The block with `attend` in place of a plain `self.attn` call (cached decoding uses
        `self.attn.decode`): attend(attn_norm(x)) returns (attention output, extra); returns
        (block output, extra)."""
        attn_in = x if self.attn_norm is None else self.attn_norm(x)
        attn_out, extra = attend(attn_in)
        # The residual stream keeps its dtype (float32 under autocast, where the branches
        # give config.dtype).
        x = x + attn_out.astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), extra


class PredictionHead(nnx.Module):
    """dense (no bias) -> exact GELU -> LayerNorm: the transform before the tied vocab projection.
    dense and GELU compute in config.dtype, the norm in config.stream_dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dense = _dense(
            config.hidden_size, config.hidden_size, config.init_std, ("embed", "mlp"), config, rngs
        )
        self.norm = layer_norm(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(jax.nn.gelu(self.dense(x), approximate=False))


@jax.custom_vjp
def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [..., H] @ embedding [V, H]^T -> float32 logits [..., V] from operands of one (low)
    dtype, accumulated in float32: the vocabulary projection under precision "autocast".

    The backward is autocast's too: the logits' gradient enters the two backward matmuls in
    the operands' dtype (PyTorch autocast's logits, and so their gradient, are bf16), which
    gives gradients for x and embedding in that dtype. Plain autodiff would run both with a
    float32 operand, i.e. in float32.
    """
    return jnp.dot(x, embedding.T, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, embedding):
    return tied_logits(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals, g):
    x, embedding = residuals
    g = g.astype(x.dtype)
    d_x = jnp.dot(g, embedding)
    d_embedding = jnp.tensordot(g, x, axes=(tuple(range(g.ndim - 1)),) * 2)
    return d_x, d_embedding.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def vocab_bias(config: ModelConfig) -> nnx.Param:
    """The decoder bias [vocab], zero-initialised."""
    return nnx.Param(
        jnp.zeros((config.vocab_size,), dtype=config.param_dtype),
        out_sharding=("vocab",), eager_sharding=False,
    )
