"""Sentence embeddings from either member of a pair, pooled as sentence-transformers pools them.

    config = EmbeddingConfig(pooling="mean", normalize=True)
    vectors = embed(encoder, input_ids, attention_mask, config.pooling,
                    normalize=config.normalize)                      # float32 [rows, hidden]

The vectors come from the backbone's final hidden states (after the final norm; the MLM/LM head
is not used), with positions 0..seq-1 and padding never attended to, as transformers'
`ModernBertModel` / `ModernBertDecoderModel` compute them, then pooled exactly as
sentence-transformers 6.2's `Pooling` module does it for padded input:

  mean:         sum of the token states / max(token count, 1e-9)
  cls:          the first token of the attention mask (position 0 under right padding)
  lasttoken:    the last token of the attention mask (a row without tokens gives zeros)
  weightedmean: weights 1..n from the first token (w_j = j + 1 - first token's position),
                sum(w * state) / max(sum(w), 1e-9)

and, with normalize, divided by max(L2 norm, 1e-12) (its `Normalize` module). An exported model
(`ettin_jax.hf.sentence_transformers`) gives the same vectors in sentence-transformers.

Inputs are what the member was trained on and what its exported tokenizer adds
(`data_pipelines.special_tokens.with_special_tokens`): encoder [CLS] text [SEP], decoder
[CLS] text. Ettin pooled the encoder with "mean" (sentence-transformers' default for a plain
checkpoint) and the decoder with "lasttoken", "mean" or "weightedmean"
(retrieval_eval/train_st.py); `MEMBER_POOLINGS` holds those, and also "cls" for the encoder.

Dropout (training): with a dropout key every row gets its own key, fold_in(key, row), and runs
as a batch of one (`jax.vmap`), so that a row's dropout mask does not depend on which rows share
its call: the GradCache loss (`ettin_jax.finetune.contrastive`) re-embeds mini-batches with the
row keys of its first pass, and its gradient equals the unchunked one whatever the chunking.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from ettin_jax.models.classification import _segment_ids
from ettin_jax.models.config import Objective, check_member_choice
from ettin_jax.models.transformer import EttinModel, model_from_params, named_params

EmbeddingPooling = Literal["mean", "cls", "lasttoken", "weightedmean"]
EMBEDDING_POOLINGS: tuple[str, ...] = ("mean", "cls", "lasttoken", "weightedmean")
# The poolings each member is used with (Ettin's retrieval_eval/train_st.py; "cls" as
# sentence-transformers offers it for encoders).
MEMBER_POOLINGS: dict[str, tuple[str, ...]] = {
    "mlm": ("mean", "cls"),
    "clm": ("lasttoken", "mean", "weightedmean"),
}
# Native parameters of `EttinModel` that an embedding model does not use: the vocabulary head.
LM_HEAD_PARAMS: tuple[str, ...] = ("head", "decoder_bias")


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """How a row of hidden states becomes one embedding.

    Fields:
      pooling: "mean", "cls", "lasttoken" or "weightedmean" (module docstring; which member
        supports which: `MEMBER_POOLINGS`, checked by `check_embedding_pooling`).
      normalize: divide each embedding by its L2 norm (sentence-transformers' `Normalize`).

    Raises ValueError naming the field for a value out of range.
    """

    pooling: EmbeddingPooling = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in EMBEDDING_POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(EMBEDDING_POOLINGS)}, "
                             f"got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")


def check_embedding_pooling(objective: Objective, pooling: str) -> None:
    """Raises ValueError when `objective`'s member is not pooled with `pooling`, naming both
    and the poolings it supports (`MEMBER_POOLINGS`)."""
    check_member_choice(objective, pooling, MEMBER_POOLINGS, "embedding pooling")


def embed(model: EttinModel, input_ids: jax.Array, attention_mask: jax.Array, pooling: str,
          *, normalize: bool = False, deterministic: bool = True,
          dropout_rng: jax.Array | None = None, row_keys: jax.Array | None = None) -> jax.Array:
    """float32 embeddings [rows, hidden] of token rows, as sentence-transformers computes them
    for this member's export (module docstring).

    Args:
      model: an `EttinModel` (its vocabulary head, if any, is not used).
      input_ids: int [rows, seq] ids in [0, vocab_size), special tokens included.
      attention_mask: int or bool [rows, seq], 1 on tokens, 0 on padding (right padding as
        sentence-transformers pads; left padding is pooled as it pools it too).
      pooling: one of `MEMBER_POOLINGS[model.objective]`.
      normalize: L2-normalise the embeddings.
      deterministic: True disables dropout.
      dropout_rng: with deterministic False, row r gets the dropout key fold_in(dropout_rng, r).
      row_keys: instead of dropout_rng, the keys of the rows themselves [rows] (typed keys or
        raw uint32 [rows, 2]); what the GradCache loss passes.
    Raises ValueError for a pooling the member does not support, bad shapes or dtypes,
    (concrete) mask values other than 0/1, ids outside the vocabulary, both dropout_rng and
    row_keys, or no key when dropout is on.

    Without dropout the rows run as one batch; with it, each row is a batch of one under
    `jax.vmap`, so a row's result depends only on its ids, mask and key.
    """
    check_embedding_pooling(model.objective, pooling)
    segment_ids = _segment_ids(input_ids, attention_mask)
    model.check_inputs(input_ids, segment_ids, None)
    if dropout_rng is not None and row_keys is not None:
        raise ValueError("pass dropout_rng or row_keys, not both")
    dropout_on = not deterministic and model.config.attention_output_dropout > 0
    if dropout_rng is not None:
        row_keys = jax.vmap(lambda r: jax.random.fold_in(dropout_rng, r))(
            jnp.arange(input_ids.shape[0]))
    if dropout_on and row_keys is None:
        raise ValueError("deterministic=False needs a dropout_rng (or row_keys)")
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    if dropout_on:
        def one_row(ids: jax.Array, segments: jax.Array, key: jax.Array) -> jax.Array:
            return model(ids[None], segments[None], positions[None], deterministic=False,
                         dropout_rng=key)[0]

        hidden = jax.vmap(one_row)(input_ids, segment_ids, row_keys)
    else:
        hidden = model(input_ids, segment_ids,
                       jnp.broadcast_to(positions, input_ids.shape), deterministic=True)
    pooled = pool_embeddings(hidden, segment_ids, pooling)
    return l2_normalize(pooled) if normalize else pooled


def pool_embeddings(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """float32 [rows, hidden] from hidden states [rows, seq, hidden] and a 0/1 mask
    [rows, seq], computed (in float32) as sentence-transformers 6.2's `Pooling._forward_padded`
    computes `pooling` (module docstring). Padding states are never read, so they may be
    anything but non-finite values there do not leak. Raises ValueError for another pooling."""
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask > 0
    seq = hidden.shape[1]
    first = jnp.argmax(mask, axis=1)  # the first token (0 for a row without tokens)
    if pooling == "cls":
        return jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]
    if pooling == "lasttoken":
        last = jnp.argmax(jnp.where(mask, jnp.arange(seq), -1), axis=1)
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return jnp.where(mask.any(axis=1, keepdims=True), picked, 0.0)
    if pooling == "mean":
        weights = mask.astype(jnp.float32)
    elif pooling == "weightedmean":
        weights = jnp.where(mask, jnp.arange(1, seq + 1)[None, :] - first[:, None], 0)
        weights = weights.astype(jnp.float32)
    else:
        raise ValueError(f"pooling must be one of {', '.join(EMBEDDING_POOLINGS)}, "
                         f"got {pooling!r}")
    # where, not a product: hidden states at padding are meaningless and may be inf/nan.
    summed = jnp.where(mask[..., None], hidden * weights[..., None], 0.0).sum(axis=1)
    return summed / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)


def l2_normalize(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
    """vectors / max(||vectors||_2, eps) along the last axis (torch.nn.functional.normalize,
    which sentence-transformers' `Normalize` and `cos_sim` use)."""
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / jnp.maximum(norm, eps)


def without_lm_head(model: EttinModel) -> EttinModel:
    """A copy of `model` without its vocabulary head (`LM_HEAD_PARAMS` set to None): what an
    embedding model trains and exports. Its arrays are shared; `model` is not modified. `embed`
    and `ettin_jax.hf.sentence_transformers` take either."""
    copy = model_from_params(model.config, model.objective, named_params(model))
    for name in LM_HEAD_PARAMS:
        setattr(copy, name, None)
    return copy

