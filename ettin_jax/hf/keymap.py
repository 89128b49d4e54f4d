"""The one map between native parameter paths and HuggingFace ModernBERT tensor names.

Native kernels are [in, out] (fused ones [in, slot, out]); HF/PyTorch weights are [out, in].
The encoder stores attention as one fused `Wqkv` [3H, H] (rows Q, K, V, head-major inside);
the decoder as separate `q_proj`, `k_proj`, `v_proj` [H, H]. The head is `head.*` for the
encoder and `lm_head.*` for the decoder. `decoder.weight` is tied to the token embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from ettin_jax.errors import CheckpointError
from ettin_jax.models.config import ModelConfig, Objective

NativePath = tuple[str | int, ...]


@dataclass(frozen=True)
class KeyRule:
    """One native parameter and the HF tensor(s) it becomes.

    to_hf maps the native array to one array per name in `hf_names`; from_hf takes those
    arrays (in `hf_names` order) and inverts it.
    """

    native: NativePath
    hf_names: tuple[str, ...]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    from_hf: Callable[..., np.ndarray]


def _same(name: str, native: NativePath) -> KeyRule:
    return KeyRule(native, (name,), lambda a: (a,), lambda a: a)


def _transposed(name: str, native: NativePath) -> KeyRule:
    return KeyRule(native, (name,), lambda a: (a.T,), lambda a: a.T)


def _fused(name: str, native: NativePath, slots: int) -> KeyRule:
    """[in, slots, out] <-> [slots * out, in] (slot-major rows, as HF's fused Wqkv and Wi)."""
    return KeyRule(
        native,
        (name,),
        lambda a: (a.reshape(a.shape[0], -1).T,),
        lambda w: w.T.reshape(w.shape[1], slots, w.shape[0] // slots),
    )


def _split_qkv(prefix: str, native: NativePath) -> KeyRule:
    """[H, 3, H] <-> q_proj, k_proj, v_proj [H, H] each."""
    names = tuple(f"{prefix}.{p}_proj.weight" for p in "qkv")
    return KeyRule(
        native,
        names,
        lambda a: tuple(a[:, s, :].T for s in range(3)),
        lambda q, k, v: np.stack([q.T, k.T, v.T], axis=1),
    )


def key_rules(config: ModelConfig, objective: Objective) -> list[KeyRule]:
    """Every native parameter of an `EttinModel(config, objective)` with its HF name(s)."""
    head = "head" if objective == "mlm" else "lm_head"
    rules = [
        _same("model.embeddings.tok_embeddings.weight", ("embeddings", "tok_embeddings", "embedding")),
        _same("model.embeddings.norm.weight", ("embeddings", "norm", "scale")),
    ]
    for i in range(config.num_layers):
        hf, nat = f"model.layers.{i}", ("layers", i)
        if i != 0:
            rules.append(_same(f"{hf}.attn_norm.weight", (*nat, "attn_norm", "scale")))
        if objective == "mlm":
            rules.append(_fused(f"{hf}.attn.Wqkv.weight", (*nat, "attn", "Wqkv", "kernel"), 3))
        else:
            rules.append(_split_qkv(f"{hf}.attn", (*nat, "attn", "Wqkv", "kernel")))
        rules += [
            _transposed(f"{hf}.attn.Wo.weight", (*nat, "attn", "Wo", "kernel")),
            _same(f"{hf}.mlp_norm.weight", (*nat, "mlp_norm", "scale")),
            _fused(f"{hf}.mlp.Wi.weight", (*nat, "mlp", "Wi", "kernel"), 2),
            _transposed(f"{hf}.mlp.Wo.weight", (*nat, "mlp", "Wo", "kernel")),
        ]
    rules += [
        _same("model.final_norm.weight", ("final_norm", "scale")),
        _transposed(f"{head}.dense.weight", ("head", "dense", "kernel")),
        _same(f"{head}.norm.weight", ("head", "norm", "scale")),
        _same("decoder.bias", ("decoder_bias",)),
    ]
    return rules


def classifier_key_rules(config: ModelConfig, objective: Objective) -> list[KeyRule]:
    """Every native parameter of an `EttinClassifier` (ettin_jax.models.classification) with
    its HF name in transformers' `ModernBertForSequenceClassification` /
    `ModernBertDecoderForSequenceClassification`: the backbone's `key_rules` under
    ("backbone", ...) without the vocabulary head, then `head.dense`, `head.norm` and
    `classifier.weight`, plus `classifier.bias` for the encoder (the decoder's classifier has a
    bias only with `classifier_bias`, which ModernBERT configs leave False)."""
    rules = [dataclasses.replace(rule, native=("backbone", *rule.native))
             for rule in key_rules(config, objective)
             if rule.native[0] not in ("head", "decoder_bias")]
    rules += [
        _transposed("head.dense.weight", ("head", "dense", "kernel")),
        _same("head.norm.weight", ("head", "norm", "scale")),
        _transposed("classifier.weight", ("classifier", "kernel")),
    ]
    if objective == "mlm":
        rules.append(_same("classifier.bias", ("classifier", "bias")))
    return rules


TIED_HF_NAMES: tuple[str, ...] = ("decoder.weight",)


def hf_shapes(native_shapes: dict[NativePath, tuple[int, ...]], config: ModelConfig,
              objective: Objective, *, rules: list[KeyRule] | None = None
              ) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from native parameter shapes (abstractly: nothing allocated).
    `rules` defaults to `key_rules(config, objective)` (a classifier passes
    `classifier_key_rules`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in key_rules(config, objective) if rules is None else rules:
        native = jax.ShapeDtypeStruct(native_shapes[rule.native], np.float32)
        for name, out in zip(rule.hf_names, jax.eval_shape(rule.to_hf, native)):
            shapes[name] = tuple(out.shape)
    return shapes


def check_hf_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                     *, source: str) -> None:
    """Checks HF tensor names and shapes `found` in `source` against `expected` (`hf_shapes`).

    The tied `decoder.weight` may be present or not. Raises CheckpointError naming the missing
    or unexpected tensors, or the first tensor whose shape differs, with both shapes.
    """
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:3]}{more} "
                              f"({len(missing)} of {len(expected)})")
    unexpected = sorted(set(found) - set(expected) - set(TIED_HF_NAMES))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]} for this "
                              f"architecture (config.json and weights disagree?)")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(found[name])}, "
                                  f"config.json implies {shape}")


def to_hf_tensors(
    params: dict[NativePath, np.ndarray], config: ModelConfig, objective: Objective, *,
    rules: list[KeyRule] | None = None,
) -> dict[str, np.ndarray]:
    """HF state dict (numpy, [out, in]) from a flat native param dict {path: array}.

    `rules` defaults to `key_rules(config, objective)`. Raises ValueError naming a native
    parameter the map expects and `params` lacks, or one the map would drop: every parameter
    is written.
    """
    rules = key_rules(config, objective) if rules is None else rules
    mapped = {rule.native for rule in rules}
    dropped = sorted(".".join(map(str, p)) for p in set(params) - mapped)
    if dropped:
        raise ValueError(f"the HF key map has no name for parameters {dropped}")
    tensors: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.native not in params:
            raise ValueError(f"native parameter {'.'.join(map(str, rule.native))} is missing")
        for name, array in zip(rule.hf_names, rule.to_hf(np.asarray(params[rule.native]))):
            tensors[name] = np.ascontiguousarray(array)
    return tensors


def from_hf_tensors(
    tensors: dict[str, np.ndarray], config: ModelConfig, objective: Objective, *,
    rules: list[KeyRule] | None = None,
) -> dict[NativePath, np.ndarray]:
    """Flat native param dict {path: array} from an HF state dict (inverse of `to_hf_tensors`).

    `rules` defaults to `key_rules(config, objective)`. Check names and shapes first with
    `check_hf_tensors`; raises ValueError naming the first HF tensor the map needs and
    `tensors` lacks.
    """
    params: dict[NativePath, np.ndarray] = {}
    for rule in key_rules(config, objective) if rules is None else rules:
        missing = [name for name in rule.hf_names if name not in tensors]
        if missing:
            raise ValueError(f"HF tensor {missing[0]} is missing")
        params[rule.native] = rule.from_hf(*(np.asarray(tensors[n]) for n in rule.hf_names))
    return params
