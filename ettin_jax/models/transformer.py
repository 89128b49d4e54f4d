"""`EttinModel`: the one network behind both members of an Ettin pair.

    encoder = EttinModel(config, "mlm", rngs=nnx.Rngs(0))   # bidirectional attention
    decoder = EttinModel(config, "clm", rngs=nnx.Rngs(0))   # causal attention
    hidden = model(input_ids, segment_ids, positions)       # [B, S, H]
    logits = model.logits(hidden)                           # [B, S, V]
    sparse = model.logits(pack_masked_tokens(hidden, mask, capacity).values)   # MLM: [C, V]

The objective changes only the attention mask (causal or not, and the local window that goes
with it); parameters have the same names and shapes for both, so weights move between them
(`with_objective`). `named_params` and `model_from_params` are the one way in and out of a
model's weights for checkpoints and HuggingFace interchange.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ettin_jax.errors import did_you_mean
from ettin_jax.models.config import OBJECTIVES, ModelConfig, Objective
from ettin_jax.models.layers import (
    Embeddings,
    PredictionHead,
    TransformerBlock,
    layer_norm,
    rope_by_kind,
    tied_logits,
    vocab_bias,
)
from ettin_jax.models.rope import document_positions

ParamPath = tuple[str | int, ...]


class EttinModel(nnx.Module):
    """ModernBERT/Ettin transformer with a tied, biased vocabulary head.

    Args:
      config: the architecture (`ModelConfig`).
      objective: "mlm" builds the bidirectional encoder, "clm" the causal decoder.
      rngs: NNX rngs for parameter initialisation (stream "params" or default).
    Raises ValueError for an unknown objective.

    The network knows nothing of meshes: one GraphDef serves every mesh. Under a sharded step,
    the attention kernels find where the batch lives at call time
    (`pallas_kernels.partitioning.kernels_sharded_over`).
    """

    def __init__(self, config: ModelConfig, objective: Objective, *, rngs: nnx.Rngs):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {objective!r}.{did_you_mean(objective, OBJECTIVES)} "
                f"Valid: {', '.join(OBJECTIVES)}"
            )
        self.config = config
        self.objective = objective
        causal = objective == "clm"
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List(
            [TransformerBlock(config, i, causal=causal, rngs=rngs)
             for i in range(config.num_layers)]
        )
        self.final_norm = layer_norm(config, rngs=rngs)
        self.head = PredictionHead(config, rngs=rngs)
        self.decoder_bias = vocab_bias(config)

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [B, S, hidden] (after the final norm, before the head), in
        config.stream_dtype (float32 under precision "autocast").

        Args:
          input_ids: int [B, S] token ids in [0, vocab_size).
          segment_ids: int [B, S]; tokens attend only within their segment, 0 marks padding
            (whose hidden states are meaningless and must be ignored). None = one document.
          positions: int [B, S] RoPE positions; None = restart at 0 at every segment start.
          deterministic: True disables dropout (evaluation, export, parity).
          dropout_rng: PRNG key for dropout, required when deterministic is False.
        Raises ValueError for bad shapes or dtypes, ids outside the vocabulary (checked when
        the ids are concrete), or a missing dropout key.
        """
        self.check_inputs(input_ids, segment_ids, positions)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = document_positions(segment_ids)
        if not deterministic and dropout_rng is None and self.config.attention_output_dropout > 0:
            raise ValueError("deterministic=False needs a dropout_rng key")
        rope = rope_by_kind(self.config, positions)
        hidden = self.embeddings(input_ids)
        for index, block in enumerate(self.layers):
            layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            hidden = block(
                hidden, rope, segment_ids, deterministic=deterministic, dropout_rng=layer_rng
            )
        return self.final_norm(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits [..., vocab] from hidden states [..., hidden] (any leading shape).

        head (dense -> GELU -> norm), then the tied embedding transpose plus the decoder bias.
        Pass packed rows (`pallas_kernels.pack_masked_tokens`) to run the head only where it is
        needed. The projection takes config.dtype operands; the logits are config.dtype under
        precision "uniform", float32 under "autocast" (float32 accumulation and bias,
        `layers.tied_logits`).
        """
        transformed = self.head(hidden)
        config = self.config
        if config.precision == "uniform":
            return self.embeddings.tok_embeddings.attend(transformed) + self.decoder_bias[
                ...].astype(transformed.dtype)
        embedding = self.embeddings.tok_embeddings.embedding[...].astype(config.dtype)
        logits = tied_logits(transformed.astype(config.dtype), embedding)
        return logits + self.decoder_bias[...].astype(logits.dtype)

    def check_inputs(
        self, input_ids: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None
    ) -> None:
        """Raises ValueError for bad shapes or dtypes, or (for concrete ids) ids outside the
        vocabulary, naming the value: the checks `__call__` runs first."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        for name, array in (("segment_ids", segment_ids), ("positions", positions)):
            if array is not None and tuple(array.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"{name} shape {tuple(array.shape)} != input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
        if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
            ids = np.asarray(input_ids)
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
                )


def named_params(model: EttinModel) -> dict[ParamPath, jax.Array]:
    """Every parameter of `model` by path, e.g. ("layers", 1, "attn", "Wqkv", "kernel")."""
    return {
        tuple(path): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def model_from_params(
    config: ModelConfig, objective: Objective, params: dict[ParamPath, jax.Array | np.ndarray]
) -> EttinModel:
    """An `EttinModel` holding exactly `params` (cast to config.param_dtype); no random init.

    Raises ValueError naming a missing or unexpected parameter, or a shape mismatch with both
    shapes.
    """
    model = nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    expected = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    unexpected = sorted(".".join(map(str, p)) for p in params.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"unexpected parameters {unexpected} for this architecture")
    for path, var in expected.items():
        name = ".".join(map(str, path))
        if path not in params:
            raise ValueError(f"parameter {name} is missing")
        want = tuple(var.get_value().shape)
        if tuple(params[path].shape) != want:
            raise ValueError(f"parameter {name} has shape {tuple(params[path].shape)}, "
                             f"the architecture needs {want}")
        var.set_value(jnp.asarray(params[path], dtype=config.param_dtype))
    nnx.update(model, state)
    return model


def with_objective(model: EttinModel, objective: Objective) -> EttinModel:
    """The same weights as the other member of the pair (Ettin's cross-objective training):
    an encoder from a decoder or back. Shares no state with `model`."""
    params = {path: jnp.array(value) for path, value in named_params(model).items()}
    return model_from_params(model.config, objective, params)
