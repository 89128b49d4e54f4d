"""Incremental decoding of the causal decoder with a key/value cache.

    cache = init_cache(decoder, batch=1, max_len=prompt_len + new_tokens)
    logits, cache = prefill(decoder, prompt_ids, cache)       # [B, V]: next-token logits
    logits, cache = decode_step(decoder, next_ids, cache)      # one token per row, repeat

The model's own layers run the step (`TransformerBlock.with_attention` around
`Attention.decode`): the same parameters, RoPE at each token's absolute position with the
layer kind's theta, and the decoder mask of `pallas_kernels.flash_attention.mask.is_visible`
(causal; local layers keep the HuggingFace left window). The logits therefore equal the full
forward's, `model.logits(model(ids))[:, i]`, up to float rounding.

Every row of a batch is one document of the same length: prompts are not padded (there is no
left-padding support), so one fill length serves the whole batch. Attention over the cache is
dense over all max_len slots, masked; positions past the fill are never visible.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ettin_jax.models.layers import rope_by_kind
from ettin_jax.models.transformer import EttinModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the positions decoded so far (a pytree).

    keys[l], values[l]: [batch, max_len, heads, head_dim] in the model's compute dtype; slots
    0 .. length-1 are filled. length: int32 scalar, the same for every row.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array

    @property
    def batch(self) -> int:
        """Rows (documents) in the cache."""
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        """Positions the buffers hold: prompt plus generated tokens must fit."""
        return self.keys[0].shape[1]


def init_cache(model: EttinModel, batch: int, max_len: int) -> KVCache:
    """An empty cache (length 0) for `batch` documents of up to `max_len` tokens.

    Raises ValueError for an encoder (objective "mlm") or batch / max_len below 1.
    """
    _check_decoder(model)
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
    cfg = model.config
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    buffers = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return KVCache(buffers, buffers, jnp.zeros((), jnp.int32))


def prefill(model: EttinModel, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the prompts input_ids [B, T] (positions length .. length+T-1 of the cache, usually
    an empty one) through the decoder.

    Returns the float32 logits of the last position [B, V] (the distribution of the next token)
    and the cache extended by T. Jit-able. Raises ValueError for an encoder, bad shapes, ids
    outside the vocabulary, a batch other than the cache's, or prompts that do not fit in the
    cache (checked against the filled length when it is concrete; under an outer jit an
    overflowing call returns NaN logits instead).
    """
    input_ids = jnp.asarray(input_ids)
    _check_decoder(model)
    model.check_inputs(input_ids, None, None)
    _check_fits(input_ids, cache)
    return _extend(model, input_ids, cache)


def decode_step(
    model: EttinModel, token_ids: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row, token_ids [B], at position `cache.length`.

    Returns the float32 logits of the following token [B, V] and the cache extended by one.
    Compiled once per (model structure, batch, max_len): the fill length is traced. Raises
    ValueError as `prefill` does (a full cache included).
    """
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be [batch], got shape {tuple(token_ids.shape)}")
    return prefill(model, token_ids[:, None], cache)


def _check_decoder(model: EttinModel) -> None:
    if model.objective != "clm":
        raise ValueError(
            f"cached decoding needs a causal decoder (objective 'clm'); this model's objective "
            f"is {model.objective!r}"
        )


def _check_fits(input_ids: jax.Array, cache: KVCache) -> None:
    batch, seq = input_ids.shape
    if batch != cache.batch:
        raise ValueError(f"input batch {batch} != cache batch {cache.batch}")
    filled = 0 if isinstance(cache.length, jax.core.Tracer) else int(cache.length)
    if filled + seq > cache.max_len:
        raise ValueError(
            f"{seq} new tokens after {filled} cached ones exceed the cache's max_len "
            f"{cache.max_len}"
        )


@nnx.jit
def _extend(model: EttinModel, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    start = cache.length
    seq = input_ids.shape[1]
    positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), input_ids.shape)
    rope = rope_by_kind(model.config, positions)
    hidden = model.embeddings(input_ids)
    keys, values = [], []
    for block, layer_keys, layer_values in zip(model.layers, cache.keys, cache.values):
        attend = functools.partial(block.attn.decode, rope=rope, keys=layer_keys,
                                   values=layer_values, start=start)
        hidden, (layer_keys, layer_values) = block.with_attention(hidden, attend)
        keys.append(layer_keys)
        values.append(layer_values)
    logits = model.logits(model.final_norm(hidden[:, -1])).astype(jnp.float32)
    # Past max_len the buffer writes would clamp and overwrite earlier slots: poison the result.
    logits = jnp.where(start + seq <= cache.max_len, logits, jnp.nan)
    return logits, KVCache(tuple(keys), tuple(values), start + seq)
