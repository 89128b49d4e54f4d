"""A member of the pair as a sentence-transformers model directory.

    path = save_sentence_transformer(encoder, "out/", pooling="mean", normalize=True,
                                     tokenizer_dir=tok, max_seq_length=512)
    SentenceTransformer(str(path)).encode(texts)     # == embed(encoder, ..., "mean", normalize)

The directory (written with numpy and json; torch and sentence-transformers are not needed):
  config.json, model.safetensors   the backbone as transformers' `ModernBertModel` (encoder) or
                                   `ModernBertDecoderModel` (decoder): the member's export
                                   (`ettin_jax.hf.pretrained`: same config and tensor names,
                                   `ettin_jax.hf.keymap`) without the vocabulary head, and
                                   `architectures` naming the base class, as sentence-transformers
                                   itself saves one. AutoModel loads it without unused tensors.
  tokenizer files                  written as `save_pretrained` writes them: transformers adds
                                   the member's special tokens (encoder [CLS] text [SEP],
                                   decoder [CLS] text; `with_special_tokens`).
  modules.json                     Transformer -> Pooling (-> Normalize)
  sentence_bert_config.json        max_seq_length (inputs are truncated to it), do_lower_case
  config_sentence_transformers.json  similarity "cosine", no prompts
  1_Pooling/config.json            the pooling mode
  2_Normalize/                     when normalize

The module configs use the long-standing format (module types `sentence_transformers.models.*`,
`pooling_mode_*` flags, `word_embedding_dimension`) that sentence-transformers 2.x-5.x write and
6.x reads without warnings, so that older installations (MTEB's, Ettin's) load it too. No
`__version__` is written: nothing here depends on one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipelines.special_tokens import PROJECT, SpecialTokens
from ettin_jax.storage import write_text_atomically
from ettin_jax.hf.config import to_hf_config
from ettin_jax.hf.keymap import key_rules
from ettin_jax.hf.pretrained import CONFIG_FILE, write_hf_weights, write_tokenizer
from ettin_jax.models.embedding import LM_HEAD_PARAMS, check_embedding_pooling
from ettin_jax.models.transformer import EttinModel, named_params

# transformers' base classes, what AutoModel builds from our model types.
BASE_ARCHITECTURES: dict[str, str] = {"mlm": "ModernBertModel", "clm": "ModernBertDecoderModel"}
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
# sentence-transformers' Pooling flags, in the order its configs list them.
_POOLING_FLAGS: dict[str, str] = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def save_sentence_transformer(
    model: EttinModel,
    out_dir: str | Path,
    *,
    pooling: str,
    normalize: bool,
    tokenizer_dir: str | Path,
    max_seq_length: int,
    special_tokens: SpecialTokens | None = None,
) -> Path:
    """Writes `model` (either member; with or without its vocabulary head) as a
    sentence-transformers directory at `out_dir` (created if needed; module docstring) and
    returns its path.

    `SentenceTransformer(out_dir).encode(texts)` then gives, for texts of at most
    max_seq_length tokens with special tokens, `embed(model, ids, mask, pooling,
    normalize=normalize)` of the ids the member's tokenizer gives them. pooling: one of the
    member's `MEMBER_POOLINGS`; special_tokens default to ettin-jax's layout (`PROJECT`), as
    `save_pretrained`'s do. Weights are written in param_dtype. Guarantees every backbone
    parameter is written (tensor elements equal the parameter count). Raises ValueError for a
    pooling the member does not support, max_seq_length < 1, or special-token ids outside the
    vocabulary; FileNotFoundError for a missing tokenizer_dir.
    """
    objective, config = model.objective, model.config
    check_embedding_pooling(objective, pooling)
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or (
            max_seq_length < 1):
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a directory")
    special_tokens = special_tokens or PROJECT
    special_tokens.check_vocab(config.vocab_size)

    params = {path: np.asarray(value) for path, value in named_params(model).items()
              if path[0] not in LM_HEAD_PARAMS}
    rules = [rule for rule in key_rules(config, objective) if rule.native[0] not in LM_HEAD_PARAMS]
    hf_config = to_hf_config(config, objective, special_tokens)
    hf_config["architectures"] = [BASE_ARCHITECTURES[objective]]
    out = Path(out_dir)
    write_hf_weights(out, params, config, objective, rules=rules)
    _write_json(out / CONFIG_FILE, hf_config)
    write_tokenizer(tokenizer_dir, out, objective)

    modules = [_module(0, "", "Transformer"), _module(1, POOLING_DIR, "Pooling")]
    if normalize:
        modules.append(_module(2, NORMALIZE_DIR, "Normalize"))
    _write_json(out / "modules.json", modules)
    _write_json(out / "sentence_bert_config.json",
                {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(out / "config_sentence_transformers.json",
                {"model_type": "SentenceTransformer", "prompts": {},
                 "default_prompt_name": None, "similarity_fn_name": "cosine"})
    (out / POOLING_DIR).mkdir(exist_ok=True)
    _write_json(out / POOLING_DIR / CONFIG_FILE, pooling_config(config.hidden_size, pooling))
    if normalize:
        (out / NORMALIZE_DIR).mkdir(exist_ok=True)
        _write_json(out / NORMALIZE_DIR / CONFIG_FILE, {})
    return out


def pooling_config(hidden_size: int, pooling: str) -> dict:
    """1_Pooling/config.json of sentence-transformers' Pooling with one `pooling` mode."""
    if pooling not in _POOLING_FLAGS:
        raise ValueError(f"pooling must be one of {', '.join(_POOLING_FLAGS)}, got {pooling!r}")
    return {"word_embedding_dimension": hidden_size,
            **{flag: mode == pooling for mode, flag in _POOLING_FLAGS.items()},
            "include_prompt": True}


def _module(index: int, path: str, kind: str) -> dict:
    return {"idx": index, "name": str(index), "path": path,
            "type": f"sentence_transformers.models.{kind}"}


def _write_json(path: Path, value) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")
