"""Sequence classifiers as transformers directories: write one from an `EttinClassifier`, read
one (ours, or one transformers' own `save_pretrained` wrote) back.

    path = save_classifier(classifier, "out/", tokenizer_dir=tok, id2label={0: "neg", 1: "pos"})
    model = AutoModelForSequenceClassification.from_pretrained(path)   # transformers, same logits
    classifier, meta = load_classifier(path)

An encoder becomes `ModernBertForSequenceClassification`, a decoder
`ModernBertDecoderForSequenceClassification`. The directory is the member export's
(`ettin_jax.hf.pretrained`: config.json, model.safetensors, tokenizer files) with the
classification fields (`ettin_jax.hf.config.to_hf_classifier_config`) and tensor names
(`ettin_jax.hf.keymap.classifier_key_rules`).

The decoder class pools at the last token whose id is not config.json's pad_token_id, our
classifier at the last token of attention_mask: pass the tokenizer's special tokens (its pad id)
so that both pick the same token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data_pipelines.special_tokens import PROJECT, SpecialTokens
from data_pipelines.tokenizer_files import tokenizer_file_names
from ettin_jax.storage import write_text_atomically
from ettin_jax.hf.config import from_hf_classifier_config, to_hf_classifier_config
from ettin_jax.hf.keymap import (
    check_hf_tensors,
    classifier_key_rules,
    from_hf_tensors,
    hf_shapes,
)
from ettin_jax.hf.pretrained import (
    CONFIG_FILE,
    read_hf_config,
    read_safetensors,
    with_tokenizer_ids,
    write_hf_weights,
    write_tokenizer,
)
from ettin_jax.models.classification import (
    EttinClassifier,
    classifier_from_params,
    classifier_parameter_shapes,
    classifier_params,
)


@dataclasses.dataclass(frozen=True)
class ClassifierMetadata:
    """What a classifier directory says besides the weights.

    special_tokens: pad / cls / sep (and mask / unk from tokenizer.json when present).
    id2label: {label id: name} for labels 0..num_labels-1.
    problem_type: transformers' problem_type ("single_label_classification",
      "multi_label_classification" or "regression").
    tokenizer_dir: the directory itself when it holds tokenizer files, else None.
    """

    special_tokens: SpecialTokens
    id2label: dict[int, str]
    problem_type: str
    tokenizer_dir: Path | None = None


def save_classifier(
    classifier: EttinClassifier,
    out_dir: str | Path,
    *,
    special_tokens: SpecialTokens | None = None,
    tokenizer_dir: str | Path | None = None,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
) -> Path:
    """Writes `classifier` as a transformers sequence-classification directory at `out_dir`
    (created if needed) and returns its path.

    It loads with `AutoModelForSequenceClassification` as `ModernBertForSequenceClassification`
    (encoder) or `ModernBertDecoderForSequenceClassification` (decoder) and gives the same
    logits. special_tokens default to ettin-jax's own layout (`PROJECT`); the tokenizer of
    tokenizer_dir, when given, is written as `save_pretrained` writes it (transformers then
    adds the member's special tokens to a text or a pair as ettin-jax does); id2label
    defaults to LABEL_i and problem_type to "regression" for one output, else
    "single_label_classification". Weights are written in param_dtype. Guarantees every
    parameter is written (tensor elements equal the parameter count). Raises ValueError for a
    pooling transformers cannot express (the decoder's "mean"), a bad id2label or
    problem_type, or special-token ids outside the vocabulary.
    """
    config, objective = classifier.config, classifier.objective
    special_tokens = special_tokens or PROJECT
    special_tokens.check_vocab(config.vocab_size)
    hf_config = to_hf_classifier_config(config, objective, special_tokens,
                                        classifier.head_config, id2label=id2label,
                                        problem_type=problem_type)
    params = {path: np.asarray(value) for path, value in classifier_params(classifier).items()}
    out = Path(out_dir)
    write_hf_weights(out, params, config, objective,
                     rules=classifier_key_rules(config, objective))
    write_text_atomically(out / CONFIG_FILE,
                          json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir:
        write_tokenizer(Path(tokenizer_dir), out, objective)
    return out


def load_classifier(path: str | Path) -> tuple[EttinClassifier, ClassifierMetadata]:
    """The native classifier of a transformers ModernBERT / ModernBERT-decoder
    sequence-classification directory (ours or transformers'), with its metadata.

    Weights become float32 params. Raises CheckpointError for a directory that is not such a
    checkpoint (naming the file and field: e.g. a plain MaskedLM export), a missing or
    unexpected tensor, a shape mismatch (naming the tensor and both shapes), or a config value
    the architecture cannot represent.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    config, objective, special_tokens, head, id2label, problem_type = (
        from_hf_classifier_config(hf_config, source=str(path / CONFIG_FILE)))
    rules = classifier_key_rules(config, objective)
    tensors = read_safetensors(path)
    expected = hf_shapes(classifier_parameter_shapes(config, objective, head), config,
                         objective, rules=rules)
    check_hf_tensors({k: t.shape for k, t in tensors.items()}, expected, source=str(path))
    params = from_hf_tensors({k: np.asarray(t, np.float32) for k, t in tensors.items()},
                             config, objective, rules=rules)
    tokenizer_dir = path if tokenizer_file_names(path) else None
    metadata = ClassifierMetadata(with_tokenizer_ids(special_tokens, tokenizer_dir), id2label,
                                  problem_type, tokenizer_dir)
    return classifier_from_params(config, objective, head, params), metadata


