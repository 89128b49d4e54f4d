"""config.json of transformers' ModernBERT classes <-> `ModelConfig`, objective and special tokens.

Writing: every field the installed and older transformers read, with the known traps avoided:
`layer_types` explicit (a decoder config without it gets a version-dependent default), both RoPE
thetas in the new `rope_parameters` form and the older `global_rope_theta` / `local_rope_theta`
fields, `classifier_activation: gelu` (the MLM head uses it too), the special-token ids, and
`attention_dropout: 0.0` whatever the model trained with. Ettin's one dropout sits after the
attention output projection (`attention_output_dropout`, 0.1 in the recipes) and has no HF field
of its own: transformers' ModernBERT classes apply `attention_dropout` both there and to the
attention probabilities, which Ettin never dropped. Exports therefore carry 0.0, and fine-tuning
an export in transformers runs without that dropout unless the user sets it.

Reading: a released ModernBERT/Ettin config (either RoPE form, `layer_types` or
`global_attn_every_n_layers`, `local_attention` or a decoder's half-window `sliding_window`).
`attention_dropout` is read into `attention_output_dropout` as before, so a re-imported export
has no training dropout (0.0) unless overridden; a recipe that starts from it
(`checkpoint.init_from`) uses its own `model.attention_output_dropout`.
A field whose value this architecture cannot represent is an error naming the file, the field and
the supported values; fields that do not change the network (dtype, pooling, ...) are ignored.
"""

from __future__ import annotations

from typing import Any

from data_pipelines.special_tokens import MODERNBERT, SpecialTokens
from ettin_jax.errors import CheckpointError
from ettin_jax.models.classification import EXPORTABLE_POOLINGS, HeadConfig
from ettin_jax.models.config import ModelConfig, Objective

MODEL_TYPES: dict[Objective, str] = {"mlm": "modernbert", "clm": "modernbert-decoder"}
ARCHITECTURES: dict[Objective, str] = {
    "mlm": "ModernBertForMaskedLM",
    "clm": "ModernBertDecoderForCausalLM",
}
_HF_LAYER_TYPE = {"global": "full_attention", "local": "sliding_attention"}

# Fields that must hold these values for the checkpoint to be this architecture (HF defaults
# in the comments are what a config without the field means).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_activation": ("gelu", "gelu_python"),  # exact (erf) GELU; default gelu
    "classifier_activation": ("gelu", "gelu_python"),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "norm_bias": (False,),
    "decoder_bias": (True,),
    "tie_word_embeddings": (True,),
    "embedding_dropout": (0.0, 0),  # the only dropout Ettin trains with is after attention
    "mlp_dropout": (0.0, 0),
}


def to_hf_config(
    config: ModelConfig,
    objective: Objective,
    special_tokens: SpecialTokens,
    *,
    max_position_embeddings: int = 8192,
) -> dict[str, Any]:
    """The config.json dict that makes transformers build this member of the pair.

    max_position_embeddings is informational (RoPE has no table); 8192 as in ModernBERT.
    """
    thetas = {"full_attention": config.global_rope_theta,
              "sliding_attention": config.local_rope_theta}
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[objective]],
        "model_type": MODEL_TYPES[objective],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "layer_types": [_HF_LAYER_TYPE[kind] for kind in config.layer_types],
        "local_attention": config.local_attention,
        "rope_parameters": {
            kind: {"rope_type": "default", "rope_theta": theta} for kind, theta in thetas.items()
        },
        "global_rope_theta": config.global_rope_theta,
        "local_rope_theta": config.local_rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "initializer_cutoff_factor": 2.0,
        # Not config.attention_output_dropout: transformers would also drop attention
        # probabilities with it (see the module docstring).
        "attention_dropout": 0.0,
        "pad_token_id": special_tokens.pad,
        "bos_token_id": special_tokens.bos,
        "eos_token_id": special_tokens.eos,
        "cls_token_id": special_tokens.cls,
        "sep_token_id": special_tokens.sep,
        "dtype": config.param_dtype,
    }
    hf.update({name: values[0] for name, values in _REQUIRED_VALUES.items()})
    if config.global_layers is None:
        hf["global_attn_every_n_layers"] = config.global_attn_every_n_layers  # transformers 4.x
    if objective == "clm":
        hf["use_cache"] = True
    return hf


def from_hf_config(
    hf: dict[str, Any], *, source: str
) -> tuple[ModelConfig, Objective, SpecialTokens]:
    """The architecture, objective and special tokens a ModernBERT config.json describes.

    `source` names the file in errors. Missing fields take transformers' defaults. Raises
    CheckpointError for a model type other than ModernBERT / ModernBERT-decoder or a field
    value this architecture cannot represent.
    """

    def fail(field: str, message: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}: {message}")

    model_type = hf.get("model_type")
    objectives = {v: k for k, v in MODEL_TYPES.items()}
    if model_type not in objectives:
        raise fail("model_type", f"{model_type!r} is not a ModernBERT checkpoint; supported: "
                                 f"{', '.join(objectives)}")
    objective = objectives[model_type]
    for field, allowed in _REQUIRED_VALUES.items():
        if field in hf and hf[field] not in allowed:
            raise fail(field, f"unsupported value {hf[field]!r}; supported: "
                              f"{', '.join(map(repr, allowed))}")

    defaults = ModelConfig()
    num_layers = hf.get("num_hidden_layers", defaults.num_layers)
    global_layers, every_n = _global_layers(hf, num_layers, fail)
    local_attention = hf.get("local_attention")
    if local_attention is None and hf.get("sliding_window") not in (None, -1):
        local_attention = 2 * int(hf["sliding_window"])
    if local_attention is None:
        if "local_attention" in hf and (global_layers is None or len(global_layers) < num_layers):
            raise fail("local_attention", "null, but the config has sliding-attention layers")
        local_attention = defaults.local_attention
    global_theta, local_theta = _rope_thetas(hf, fail)
    try:
        config = ModelConfig(
            vocab_size=hf.get("vocab_size", defaults.vocab_size),
            hidden_size=hf.get("hidden_size", defaults.hidden_size),
            intermediate_size=hf.get("intermediate_size", defaults.intermediate_size),
            num_layers=num_layers,
            num_heads=hf.get("num_attention_heads", defaults.num_heads),
            global_attn_every_n_layers=every_n,
            global_layers=global_layers,
            local_attention=local_attention,
            global_rope_theta=global_theta,
            local_rope_theta=local_theta,
            norm_eps=hf.get("norm_eps", defaults.norm_eps),
            attention_output_dropout=float(hf.get("attention_dropout", 0.0)),
            init_std=hf.get("initializer_range", defaults.init_std),
        )
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    return config, objective, _special_tokens(hf, config.vocab_size, fail)


def _global_layers(hf: dict[str, Any], num_layers: int, fail) -> tuple[tuple[int, ...] | None, int]:
    """(explicit global layer list or None, every-n) from layer_types or the older integer."""
    every_n = hf.get("global_attn_every_n_layers", 3)
    if not isinstance(every_n, int) or every_n < 1:
        raise fail("global_attn_every_n_layers", f"must be a positive integer, got {every_n!r}")
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return None, every_n  # Ettin's pattern: layer i is global iff i % n == 0
    kinds = {v: k for k, v in _HF_LAYER_TYPE.items()}
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise fail("layer_types", f"must list {num_layers} layer types (num_hidden_layers), "
                                  f"got {layer_types!r}")
    unknown = sorted({t for t in layer_types if t not in kinds})
    if unknown:
        raise fail("layer_types", f"unsupported {unknown}; supported: {', '.join(kinds)}")
    global_layers = tuple(i for i, t in enumerate(layer_types) if kinds[t] == "global")
    if global_layers == tuple(range(0, num_layers, every_n)):
        return None, every_n
    return global_layers, every_n


def _rope_thetas(hf: dict[str, Any], fail) -> tuple[float, float]:
    """(global, local) RoPE theta from `rope_parameters` or the older per-kind fields."""
    thetas = {"full_attention": hf.get("global_rope_theta", 160_000.0),
              "sliding_attention": hf.get("local_rope_theta", 10_000.0)}
    parameters = hf.get("rope_parameters") or {}
    for kind in thetas:
        entry = parameters.get(kind) or {}
        rope_type = entry.get("rope_type", "default")
        if rope_type != "default":
            raise fail(f"rope_parameters.{kind}.rope_type",
                       f"unsupported {rope_type!r}; supported: 'default' (no RoPE scaling)")
        thetas[kind] = entry.get("rope_theta", thetas[kind])
    if hf.get("rope_scaling"):
        raise fail("rope_scaling", f"unsupported {hf['rope_scaling']!r}; only unscaled RoPE")
    return float(thetas["full_attention"]), float(thetas["sliding_attention"])


def _special_tokens(hf: dict[str, Any], vocab_size: int, fail) -> SpecialTokens:
    """pad / cls (or bos) / sep (or eos) ids; transformers' ModernBERT defaults when absent."""
    ids = {
        "pad": hf.get("pad_token_id", MODERNBERT.pad),
        "cls": hf.get("cls_token_id", hf.get("bos_token_id", MODERNBERT.cls)),
        "sep": hf.get("sep_token_id", hf.get("eos_token_id", MODERNBERT.sep)),
    }
    for name, value in ids.items():
        if isinstance(value, list) and value:  # eos_token_id may be a list
            ids[name] = value = value[0]
        if not isinstance(value, int) or not 0 <= value < vocab_size:
            raise fail(f"{name}_token_id", f"must be a token id in [0, {vocab_size}), "
                                           f"got {value!r}")
    modernbert_layout = (ids["pad"], ids["cls"], ids["sep"]) == (
        MODERNBERT.pad, MODERNBERT.cls, MODERNBERT.sep)
    extra = {"mask": MODERNBERT.mask, "unk": MODERNBERT.unk} if modernbert_layout else {}
    return SpecialTokens(**ids, **extra)


# --- Sequence classification (`ettin_jax.models.classification`) ---------------------------

CLASSIFIER_ARCHITECTURES: dict[Objective, str] = {
    "mlm": "ModernBertForSequenceClassification",
    "clm": "ModernBertDecoderForSequenceClassification",
}
# transformers' problem types (they choose the loss; the network is the same for all three).
PROBLEM_TYPES: tuple[str, ...] = ("single_label_classification", "multi_label_classification",
                                  "regression")


def default_problem_type(num_labels: int) -> str:
    """What transformers assumes for integer labels: "regression" for one output, else
    "single_label_classification"."""
    return "regression" if num_labels == 1 else "single_label_classification"


def to_hf_classifier_config(
    config: ModelConfig,
    objective: Objective,
    special_tokens: SpecialTokens,
    head: HeadConfig,
    *,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
) -> dict[str, Any]:
    """The config.json dict of transformers' sequence-classification class for this member:
    `to_hf_config`'s fields with the classification architecture, id2label / label2id
    (default LABEL_i), problem_type (default `default_problem_type`), classifier_dropout,
    classifier_bias False, and for the encoder classifier_pooling.

    Raises ValueError naming the value for a pooling transformers cannot express (the decoder's
    "mean"), id2label not covering exactly 0..num_labels-1 with distinct names, or an unknown
    problem_type ("regression" with several outputs is allowed, as in transformers).
    """
    if head.pooling not in EXPORTABLE_POOLINGS[objective]:
        raise ValueError(
            f"pooling {head.pooling!r} of the {objective!r} member has no transformers "
            f"equivalent ({CLASSIFIER_ARCHITECTURES[objective]} supports "
            f"{', '.join(EXPORTABLE_POOLINGS[objective])}); it cannot be exported")
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(head.num_labels)}
    if sorted(id2label) != list(range(head.num_labels)):
        raise ValueError(f"id2label must name labels 0..{head.num_labels - 1} (num_labels "
                         f"{head.num_labels}), got ids {sorted(id2label)}")
    names = [str(id2label[i]) for i in range(head.num_labels)]
    if len(set(names)) != len(names):
        raise ValueError(f"id2label names must be distinct, got {names}")
    problem_type = problem_type or default_problem_type(head.num_labels)
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)}, "
                         f"got {problem_type!r}")
    hf = to_hf_config(config, objective, special_tokens)
    hf.update({
        "architectures": [CLASSIFIER_ARCHITECTURES[objective]],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": problem_type,
        "classifier_dropout": head.classifier_dropout,
        "classifier_bias": False,
    })
    if objective == "mlm":
        hf["classifier_pooling"] = head.pooling
    return hf


def from_hf_classifier_config(
    hf: dict[str, Any], *, source: str
) -> tuple[ModelConfig, Objective, SpecialTokens, HeadConfig, dict[int, str], str]:
    """(architecture, objective, special tokens, head, id2label, problem_type) of a
    sequence-classification config.json, as `from_hf_config` reads the backbone.

    num_labels comes from id2label (else `num_labels`, else transformers' default 2), pooling
    from classifier_pooling (encoder, default "cls"; the decoder always pools "last"),
    problem_type from the file or `default_problem_type`. Raises CheckpointError naming the
    field for an architecture other than a ModernBERT sequence classifier, classifier_bias
    true, an unknown pooling or problem type, or a malformed id2label.
    """
    def fail(field: str, message: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}: {message}")

    config, objective, special_tokens = from_hf_config(hf, source=source)
    architectures = hf.get("architectures") or []
    if architectures and CLASSIFIER_ARCHITECTURES[objective] not in architectures:
        raise fail("architectures", f"{architectures} is not a sequence classifier; expected "
                                    f"{CLASSIFIER_ARCHITECTURES[objective]} (a plain member "
                                    f"export starts a classifier through "
                                    f"classifier_from_backbone)")
    if hf.get("classifier_bias", False) not in (False, 0):
        raise fail("classifier_bias", f"unsupported value {hf['classifier_bias']!r}; "
                                      f"supported: False (no bias in the head's dense)")
    id2label = _id2label(hf, fail)
    pooling = "last"
    if objective == "mlm":
        pooling = hf.get("classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise fail("classifier_pooling", f"unsupported value {pooling!r}; supported: "
                                             f"'cls', 'mean'")
    problem_type = hf.get("problem_type") or default_problem_type(len(id2label))
    if problem_type not in PROBLEM_TYPES:
        raise fail("problem_type", f"unsupported value {problem_type!r}; supported: "
                                   f"{', '.join(PROBLEM_TYPES)}")
    try:
        head = HeadConfig(num_labels=len(id2label), pooling=pooling,
                          classifier_dropout=float(hf.get("classifier_dropout", 0.0)))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    return config, objective, special_tokens, head, id2label, problem_type


def _id2label(hf: dict[str, Any], fail) -> dict[int, str]:
    """{label id: name} from id2label (JSON keys are strings), else LABEL_i for num_labels."""
    raw = hf.get("id2label")
    if raw is None:
        num_labels = hf.get("num_labels", 2)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise fail("num_labels", f"must be a positive integer, got {num_labels!r}")
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    try:
        id2label = {int(k): str(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError):
        raise fail("id2label", f"must map label ids to names, got {raw!r}") from None
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise fail("id2label", f"must name labels 0..n-1, got ids {sorted(id2label)}")
    return dict(sorted(id2label.items()))
