"""Sequence classification and regression on either member of a pair, as transformers builds it.

    head = HeadConfig(num_labels=3, pooling="cls")
    classifier = classifier_from_backbone(encoder, head, rngs=nnx.Rngs(0))
    logits = classifier(input_ids, attention_mask)        # float32 [rows, num_labels]

The backbone is the `EttinModel` hidden-state path (its MLM/LM head removed); on top of it sits
transformers' head, so that an export (`ettin_jax.hf.classification`) is the same network:

  encoder ("mlm"), `ModernBertForSequenceClassification`:
    pool (cls: the first token; mean: the mean over the non-padding tokens)
    -> head (dense without bias -> GELU -> LayerNorm, `layers.PredictionHead`)
    -> dropout(classifier_dropout) -> classifier (Linear with bias)
  decoder ("clm"), `ModernBertDecoderForSequenceClassification`:
    pool (last: the last non-padding token) -> head -> dropout -> classifier (Linear, no bias:
    transformers' `classifier_bias`, False, which also leaves the head's dense without bias)
    transformers applies head and classifier at every position and then picks the last one;
    the head acts on each position alone, so picking first is the same network.
  "mean" on the decoder is ettin-jax's own extension (transformers' decoder class has no
  pooling option); it trains and evaluates here but cannot be exported.

num_labels 1 is regression (one output, as transformers does it). Pooling reads attention_mask,
not token ids: transformers' decoder finds the last token whose id is not pad_token_id, which is
the same token when padding uses the pad id and the text holds none (a tokenizer never emits it).

Initialisation as transformers' `_init_weights` (with initializer_cutoff_factor 2.0, which our
exports write): head dense normal(0, init_std / sqrt(2 * num_layers)) truncated at 2 std, norm
scale 1, classifier normal(0, hidden_size ** -0.5) truncated at 2 std, bias 0.
`classifier_from_backbone` starts as `AutoModelForSequenceClassification.from_pretrained` of the
member's export does: an encoder export's MLM head transform has the classification head's
tensor names (`head.dense`, `head.norm`), so transformers loads it into the head and initialises
only the classifier; a decoder's LM head is `lm_head.*`, so its head starts fresh.

Logical axes (for `ettin_jax.training.mesh.RULES`): the head is `PredictionHead`'s
(`embed`, `mlp`; `norm`), the classifier kernel is (`embed`, `labels`) and its bias (`labels`).
`labels` is never sharded (a rule table without it maps it to None).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax.models.config import ModelConfig, Objective, check_member_choice
from ettin_jax.models.layers import PredictionHead, output_std, truncated_normal
from ettin_jax.models.transformer import (
    EttinModel,
    ParamPath,
    model_from_params,
    named_params,
    set_exact_params,
)

Pooling = Literal["cls", "mean", "last"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "last")
# The poolings each member supports, and those transformers' classes can express (exportable).
MEMBER_POOLINGS: dict[str, tuple[str, ...]] = {"mlm": ("cls", "mean"), "clm": ("last", "mean")}
EXPORTABLE_POOLINGS: dict[str, tuple[str, ...]] = {"mlm": ("cls", "mean"), "clm": ("last",)}
# Native parameters of `EttinModel` that a classifier drops: the vocabulary head.
_LM_HEAD_PARAMS: tuple[str, ...] = ("head", "decoder_bias")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The classification head on top of a backbone.

    Fields:
      num_labels: outputs; 1 = regression (a single score), >= 2 = classes.
      pooling: how a row becomes one vector: "cls" (first token) or "mean" (mean over the
        non-padding tokens) for the encoder, "last" (last non-padding token) or "mean" for the
        decoder (`MEMBER_POOLINGS`; decoder "mean" is not exportable).
      classifier_dropout: dropout between head and classifier (transformers'
        `classifier_dropout`), active only when the classifier runs with deterministic=False.

    Raises ValueError naming the field for a value out of range.
    """

    num_labels: int
    pooling: Pooling
    classifier_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or (
                self.num_labels < 1):
            raise ValueError(f"num_labels must be an integer >= 1 (1 = regression), "
                             f"got {self.num_labels!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, "
                             f"got {self.pooling!r}")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), "
                             f"got {self.classifier_dropout!r}")

    @property
    def regression(self) -> bool:
        """True for one output (transformers' problem_type "regression" by default)."""
        return self.num_labels == 1


def check_pooling(objective: Objective, pooling: str) -> None:
    """Raises ValueError when `objective`'s member cannot pool with `pooling`, naming both and
    the poolings it supports."""
    check_member_choice(objective, pooling, MEMBER_POOLINGS, "pooling")


def classifier_has_bias(objective: Objective) -> bool:
    """Whether transformers' classifier Linear has a bias: always for the encoder, never for the
    decoder (its bias follows `classifier_bias`, which ModernBERT configs leave False)."""
    return objective == "mlm"


class EttinClassifier(nnx.Module):
    """A backbone (`EttinModel` without its vocabulary head) with a sequence-classification head.

    Args:
      config, objective: the backbone's architecture and member ("mlm" encoder, "clm" decoder).
      head: the head (`HeadConfig`); its pooling must suit the member (`check_pooling`).
      rngs: NNX rngs for initialisation: the backbone as `EttinModel` initialises it and the
        head as transformers does (module docstring), i.e. transformers'
        `ModernBertForSequenceClassification(config)` / `ModernBertDecoderFor...(config)`.
      backbone: start from this model's weights instead of a random backbone (see
        `classifier_from_backbone`); its arrays are shared, the module itself is not modified.
    Raises ValueError for a pooling the member does not support, or a backbone whose config or
    objective differs from the arguments.
    """

    def __init__(self, config: ModelConfig, objective: Objective, head: HeadConfig, *,
                 rngs: nnx.Rngs, backbone: EttinModel | None = None):
        check_pooling(objective, head.pooling)
        if backbone is None:
            backbone = EttinModel(config, objective, rngs=rngs)
        else:
            if backbone.config != config or backbone.objective != objective:
                raise ValueError(
                    f"backbone is a {backbone.objective!r} model of {backbone.config}, the "
                    f"classifier was asked for {objective!r} of {config}")
            backbone = model_from_params(config, objective, named_params(backbone))
        for name in _LM_HEAD_PARAMS:
            setattr(backbone, name, None)
        self.config = config
        self.objective = objective
        self.head_config = head
        self.backbone = backbone
        self.head = PredictionHead(config, rngs=rngs)
        kernel = self.head.dense.kernel
        kernel.set_value(truncated_normal(output_std(config))(
            rngs.params(), kernel.shape, config.param_dtype))
        self.drop = nnx.Dropout(head.classifier_dropout)
        self.classifier = nnx.Linear(
            config.hidden_size, head.num_labels, use_bias=classifier_has_bias(objective),
            kernel_init=nnx.with_partitioning(
                truncated_normal(config.hidden_size ** -0.5), ("embed", "labels"),
                eager_sharding=False),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("labels",),
                                            eager_sharding=False),
            dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
        """float32 logits [rows, num_labels] (regression: [rows, 1] scores).

        Args:
          input_ids: int [rows, seq] token ids in [0, vocab_size).
          attention_mask: int or bool [rows, seq], 1 on tokens, 0 on padding (padding on the
            right; pooling also handles left padding). Padding is never attended to, and
            positions are 0..seq-1 as transformers' default position_ids. A row without tokens
            gives finite logits that mean nothing.
          deterministic: True disables every dropout (evaluation, export parity).
          dropout_rng: PRNG key, required when deterministic is False and any dropout is on;
            the backbone gets fold_in(key, 0), the head's dropout fold_in(key, 1).
        Raises ValueError for bad shapes or dtypes, (concrete) mask values other than 0/1 or
        ids outside the vocabulary, or a missing dropout key.
        """
        segment_ids = _segment_ids(input_ids, attention_mask)
        positions = jnp.broadcast_to(
            jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        dropout_on = (self.config.attention_output_dropout > 0
                      or self.head_config.classifier_dropout > 0)
        if not deterministic and dropout_rng is None and dropout_on:
            raise ValueError("deterministic=False needs a dropout_rng key")
        backbone_rng = head_rng = None
        if dropout_rng is not None:
            backbone_rng = jax.random.fold_in(dropout_rng, 0)
            head_rng = jax.random.fold_in(dropout_rng, 1)
        hidden = self.backbone(input_ids, segment_ids, positions, deterministic=deterministic,
                               dropout_rng=backbone_rng)
        pooled = pool(hidden, segment_ids, self.head_config.pooling)
        features = self.drop(self.head(pooled), deterministic=deterministic, rngs=head_rng)
        return self.classifier(features).astype(jnp.float32)


def _segment_ids(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The backbone's segment ids (1 = token, 0 = padding) from a 0/1 attention mask, with the
    shape, dtype and (when concrete) value checks that name what is wrong."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [rows, seq], got shape {tuple(input_ids.shape)}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                         f"shape {tuple(input_ids.shape)}")
    if not (jnp.issubdtype(attention_mask.dtype, jnp.integer)
            or attention_mask.dtype == jnp.bool_):
        raise ValueError(f"attention_mask must be integers or booleans, got dtype "
                         f"{attention_mask.dtype}")
    if not isinstance(attention_mask, jax.core.Tracer):
        values = np.unique(np.asarray(attention_mask))
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got "
                             f"values {values[~np.isin(values, (0, 1))][:5].tolist()}")
    return jnp.asarray(attention_mask).astype(jnp.int32)


def pool(hidden: jax.Array, segment_ids: jax.Array, pooling: str) -> jax.Array:
    """One vector per row [rows, hidden] from hidden states [rows, seq, hidden].

    segment_ids [rows, seq] is 1 on tokens and 0 on padding. "cls": position 0; "mean": the
    mean over tokens (summed in float32, returned in hidden's dtype; an all-padding row gives
    zeros); "last": the rightmost token (position 0 for an all-padding row), as transformers'
    decoder picks it. Raises ValueError for another pooling.
    """
    if pooling == "cls":
        return hidden[:, 0]
    tokens = segment_ids > 0
    if pooling == "mean":
        # where, not a product: hidden states at padding are meaningless and may be inf/nan.
        summed = jnp.where(tokens[..., None], hidden.astype(jnp.float32), 0.0).sum(axis=1)
        count = jnp.maximum(tokens.sum(axis=1, keepdims=True), 1)
        return (summed / count).astype(hidden.dtype)
    if pooling == "last":
        index = jnp.argmax(jnp.where(tokens, jnp.arange(tokens.shape[1]), -1), axis=1)
        return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def classifier_from_backbone(model: EttinModel, head: HeadConfig, *, rngs: nnx.Rngs,
                             keep_lm_head_transform: bool | None = None) -> EttinClassifier:
    """A classifier that starts from a trained member `model` (its weights are shared, `model`
    is not modified; its vocabulary projection and decoder bias are dropped).

    keep_lm_head_transform: start the head's dense and norm from the member's MLM/LM head
      transform (the same shapes and function) instead of transformers' fresh init. None (the
      default) does what `AutoModelForSequenceClassification.from_pretrained` does with the
      member's export: True for the encoder (its `head.*` tensors load into the classification
      head), False for the decoder (`lm_head.*` has other names). The classifier is always
      initialised fresh (normal(0, hidden_size ** -0.5) truncated at 2 std, bias 0).
    Raises ValueError for a pooling the member does not support.
    """
    classifier = EttinClassifier(model.config, model.objective, head, rngs=rngs, backbone=model)
    keep = model.objective == "mlm" if keep_lm_head_transform is None else keep_lm_head_transform
    if keep:
        nnx.update(classifier.head, nnx.state(model.head, nnx.Param))
    return classifier


def classifier_params(classifier: EttinClassifier) -> dict[ParamPath, jax.Array]:
    """Every parameter of `classifier` by path, e.g. ("backbone", "layers", 1, "attn", "Wo",
    "kernel") or ("classifier", "kernel")."""
    return named_params(classifier)


def classifier_parameter_shapes(config: ModelConfig, objective: Objective,
                                head: HeadConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter's shape by path, computed abstractly (nothing allocated)."""
    return {path: tuple(value.shape)
            for path, value in classifier_params(_abstract(config, objective, head)).items()}


def classifier_from_params(config: ModelConfig, objective: Objective, head: HeadConfig,
                           params: dict[ParamPath, jax.Array | np.ndarray]) -> EttinClassifier:
    """An `EttinClassifier` holding exactly `params` (cast to config.param_dtype); no random
    init. Raises ValueError naming a missing or unexpected parameter, or a shape mismatch with
    both shapes."""
    return set_exact_params(_abstract(config, objective, head), params, config.param_dtype,
                            what="the classifier")


def _abstract(config: ModelConfig, objective: Objective, head: HeadConfig) -> EttinClassifier:
    return nnx.eval_shape(lambda: EttinClassifier(config, objective, head, rngs=nnx.Rngs(0)))
