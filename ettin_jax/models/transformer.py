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

import dataclasses
from collections.abc import Callable

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
# `jax.lax.scan`'s unroll for the layer groups. Tests set True: the same program with the loop
# unrolled must give the unrolled stack's results bit for bit.
_SCAN_UNROLL: int | bool = 1


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

        With config.scan_layers the repeating layer groups run as one `jax.lax.scan`
        (`layer_scan` says which; `_scan_layers`), the other layers one by one; without it,
        or when the layer kinds do not repeat (an irregular `global_layers`), every layer
        runs unrolled. Layer i's dropout key is fold_in(dropout_rng, i) either way.
        """
        self.check_inputs(input_ids, segment_ids, positions)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = document_positions(segment_ids)
        if not deterministic and dropout_rng is None and self.config.attention_output_dropout > 0:
            raise ValueError("deterministic=False needs a dropout_rng key")
        rope = rope_by_kind(self.config, positions)

        def run(block: TransformerBlock, hidden: jax.Array, key: jax.Array | None) -> jax.Array:
            return block(hidden, rope, segment_ids, deterministic=deterministic, dropout_rng=key)

        hidden = self.embeddings(input_ids)
        plan = layer_scan(self.config)
        scanned = () if plan is None else range(plan.start, plan.stop)
        for index, block in enumerate(self.layers):
            if index not in scanned:
                key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
                hidden = run(block, hidden, key)
            elif index == plan.start:
                hidden = _scan_layers(list(self.layers), plan, hidden, run, dropout_rng)
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


@dataclasses.dataclass(frozen=True)
class LayerScan:
    """Layers start .. stop-1 as `groups` repetitions of a group of `period` layers whose kinds
    repeat: layer start + g * period + j is built like layer start + j for every group g."""

    start: int
    period: int
    groups: int

    @property
    def stop(self) -> int:
        """One past the last scanned layer."""
        return self.start + self.period * self.groups


def layer_scan(config: ModelConfig) -> LayerScan | None:
    """Which layers `EttinModel` runs as a scan over repeating groups, or None (every layer
    unrolled) when config.scan_layers is off or no group repeats at least twice.

    Layer 0 is never scanned (it has no attention norm); from layer 1 the shortest period of
    the layer kinds is taken, and the layers after its last whole group run unrolled. Ettin's
    pattern (global iff i % 3 == 0) gives 1 + 7 x (local, local, global) for 22 layers and
    1 + 9 x 3 for 28; an explicit `global_layers` list scans only if it happens to repeat.
    """
    if not config.scan_layers:
        return None
    kinds = config.layer_types[1:]
    for period in range(1, len(kinds) // 2 + 1):
        groups = len(kinds) // period
        if all(kinds[i] == kinds[i % period] for i in range(groups * period)):
            return LayerScan(start=1, period=period, groups=groups)
    return None


def _scan_layers(
    layers: list[TransformerBlock], plan: LayerScan, hidden: jax.Array,
    run: Callable[[TransformerBlock, jax.Array, jax.Array | None], jax.Array],
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """hidden after layers plan.start .. plan.stop-1, computed as `jax.lax.scan` over the
    groups: the step runs one group, a block of each position j merged from the position's
    GraphDef and its parameters stacked over the groups (a copy of those layers' weights;
    the parameters themselves stay per layer). Each layer gets the dropout key
    fold_in(dropout_rng, its index), as in the unrolled loop: the same computation, which
    XLA gives bit for bit when it unrolls the loop (`_SCAN_UNROLL`); compiled as a loop, the
    forward pass is still bit-identical and gradients can differ in the last bits (a loop
    body's backward pass is fused, and FMA-contracted, differently).
    """
    graphdefs, stacked = [], []
    for j in range(plan.period):
        column = [nnx.split(layers[plan.start + g * plan.period + j])
                  for g in range(plan.groups)]
        graphdef = column[0][0]
        if any(other != graphdef for other, _ in column[1:]):
            raise AssertionError(f"layers {plan.start + j} + k * {plan.period} differ in "
                                 f"structure; layer_scan should not have grouped them")
        graphdefs.append(graphdef)
        stacked.append(jax.tree.map(lambda *values: jnp.stack(values), *[s for _, s in column]))
    indices = (plan.start + plan.period * jnp.arange(plan.groups)[:, None]
               + jnp.arange(plan.period)[None, :])
    keys = None if dropout_rng is None else jax.vmap(jax.vmap(
        lambda index: jax.random.fold_in(dropout_rng, index)))(indices)

    def group(carry: jax.Array, inputs) -> tuple[jax.Array, None]:
        states, group_keys = inputs
        for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
            key = None if group_keys is None else group_keys[j]
            carry = run(nnx.merge(graphdef, state), carry, key)
        return carry, None

    hidden, _ = jax.lax.scan(group, hidden, (stacked, keys), unroll=_SCAN_UNROLL)
    return hidden


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
    return set_exact_params(model, params, config.param_dtype, what="this architecture")


def set_exact_params(module: nnx.Module, params: dict[ParamPath, jax.Array | np.ndarray],
                     dtype, *, what: str) -> nnx.Module:
    """`module` (e.g. from nnx.eval_shape) with its parameters set to exactly `params` (by
    path, cast to `dtype`); returns it. Raises ValueError naming a missing or unexpected
    parameter, or a shape mismatch with both shapes (`what` names the module in messages)."""
    state = nnx.state(module, nnx.Param)
    expected = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    unexpected = sorted(".".join(map(str, p)) for p in params.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"unexpected parameters {unexpected} for {what}")
    for path, var in expected.items():
        name = ".".join(map(str, path))
        if path not in params:
            raise ValueError(f"parameter {name} is missing")
        want = tuple(var.get_value().shape)
        if tuple(params[path].shape) != want:
            raise ValueError(f"parameter {name} has shape {tuple(params[path].shape)}, "
                             f"{what} needs {want}")
        var.set_value(jnp.asarray(params[path], dtype=dtype))
    nnx.update(module, state)
    return module


def with_objective(model: EttinModel, objective: Objective) -> EttinModel:
    """The same weights as the other member of the pair (Ettin's cross-objective training):
    an encoder from a decoder or back. Shares no state with `model`."""
    params = {path: jnp.array(value) for path, value in named_params(model).items()}
    return model_from_params(model.config, objective, params)
