"""HuggingFace model directories: write one from a native model, read one into a native model.

A directory holds config.json (`ettin_jax.hf.config`), model.safetensors (or shards listed in
model.safetensors.index.json) with transformers' tensor names (`ettin_jax.hf.keymap`), and the
tokenizer files when the model has a tokenizer. Safetensors are read and written with numpy:
torch is never needed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from etils.epath import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from data_pipelines.special_tokens import PROJECT, SpecialTokens
from data_pipelines.tokenizer_files import copy_tokenizer_files, tokenizer_file_names
from data_pipelines.tokenizers import TokenizerError, load_tokenizer
from ettin_jax.errors import CheckpointError
from ettin_jax import storage
from ettin_jax.storage import write_atomically, write_text_atomically
from ettin_jax.hf.config import from_hf_config, to_hf_config
from ettin_jax.hf.keymap import (
    TIED_HF_NAMES,
    check_hf_tensors,
    from_hf_tensors,
    hf_shapes,
    to_hf_tensors,
)
from ettin_jax.models import EttinModel, model_from_params, named_params
from ettin_jax.models.describe import parameter_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """A model with its special tokens and tokenizer, as a HuggingFace directory holds it.

    Call it like a transformers model: `logits = model(input_ids, attention_mask=None)`.
    """

    model: EttinModel
    special_tokens: SpecialTokens
    tokenizer_dir: Path | None = None

    @property
    def objective(self) -> str:
        """"mlm" (encoder) or "clm" (decoder)."""
        return self.model.objective

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """Logits [B, S, vocab] (float32 jax array) for token ids [B, S].

        attention_mask [B, S] (1 = token, 0 = padding), as in transformers: padding is never
        attended to, and positions are 0..S-1 whatever the padding (transformers' position_ids
        default). Logits at padded positions are meaningless. Raises ValueError for bad shapes,
        mask values or ids outside the vocabulary.
        """
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if attention_mask is None:
            segment_ids = jnp.ones(ids.shape, jnp.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != tuple(ids.shape):
                raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape "
                                 f"{tuple(ids.shape)}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            segment_ids = jnp.asarray(mask, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        self.model.check_inputs(ids, segment_ids, positions)
        return _logits(self.model, ids, segment_ids, positions).astype(jnp.float32)


@nnx.jit
def _logits(model: EttinModel, ids, segment_ids, positions):
    return model.logits(model(ids, segment_ids, positions))


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `save_pretrained` wrote: tensors and their elements, against the model's own."""

    path: Path
    tensors: int
    elements: int
    model_params: int
    tokenizer_files: tuple[str, ...]


def save_pretrained(
    model: EttinModel | PretrainedModel,
    path: str | Path,
    *,
    special_tokens: SpecialTokens | None = None,
    tokenizer_dir: str | Path | None = None,
) -> ExportReport:
    """Writes `model` as a transformers ModernBERT directory at `path` (created if needed).

    An encoder loads with `AutoModelForMaskedLM` as `ModernBertForMaskedLM`, a decoder with
    `AutoModelForCausalLM` as `ModernBertDecoderForCausalLM`. Special tokens and tokenizer come
    from the arguments, else from a `PretrainedModel`, else the ids of ettin-jax's own
    tokenizers (`data_pipelines.special_tokens.PROJECT`) without tokenizer files. The tokenizer
    is written so that transformers brackets text as this member does
    (`data_pipelines.special_tokens.with_special_tokens`). Weights are written in param_dtype.
    Guarantees every parameter is written: the tensor elements plus the tied `decoder.weight`
    equal the model's parameter count, or ValueError.
    """
    if isinstance(model, PretrainedModel):
        special_tokens = special_tokens or model.special_tokens
        tokenizer_dir = tokenizer_dir or model.tokenizer_dir
        model = model.model
    special_tokens = special_tokens or PROJECT
    special_tokens.check_vocab(model.config.vocab_size)
    config, objective = model.config, model.objective
    params = {path_: np.asarray(value) for path_, value in named_params(model).items()}
    path = storage.path(path)
    tensors, elements = write_hf_weights(path, params, config, objective)
    model_params = elements
    hf_config = to_hf_config(config, objective, special_tokens)
    write_text_atomically(path / CONFIG_FILE,
                          json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    written = (write_tokenizer(storage.path(tokenizer_dir), path, objective) if tokenizer_dir
               else ())
    return ExportReport(path, len(tensors), elements, model_params, written)


def write_tokenizer(source: Path, target: Path, objective: str) -> tuple[str, ...]:
    """Writes the tokenizer of `source` into the model directory `target` so that transformers
    adds the member's special tokens (`Tokenizer.save(objective=...)`); a tokenizer ettin-jax
    cannot read (no tokenizer.model / tokenizer.json, or without our specials) is copied as it
    is, and one it cannot write as tokenizer.json is copied with a warning. Returns the file
    names."""
    try:
        tokenizer = load_tokenizer(source)
    except (FileNotFoundError, TokenizerError):
        return copy_tokenizer_files(source, target)
    try:
        return tokenizer.save(target, objective=objective)
    except TokenizerError as err:  # raised before anything is written
        warnings.warn(f"{source}: tokenizer copied as it is; transformers will not add special "
                      f"tokens as ettin-jax does ({err})", stacklevel=3)
        return copy_tokenizer_files(source, target)


def from_pretrained(path: str | Path) -> PretrainedModel:
    """The native model of a transformers ModernBERT / ModernBERT-decoder directory.

    Reads config.json and model.safetensors (or its shards); weights become float32 params.
    Raises CheckpointError for a directory that is not such a checkpoint, a missing or unexpected
    tensor, a shape mismatch (naming the tensor and both shapes), an untied decoder, or a
    config value the architecture cannot represent. `path` may be a URL.
    """
    path = storage.path(path)
    hf_config = read_hf_config(path)
    config_path = path / CONFIG_FILE
    config, objective, special_tokens = from_hf_config(hf_config, source=str(config_path))

    tensors = read_safetensors(path)
    expected = hf_shapes(parameter_shapes(config, objective), config, objective)
    check_hf_tensors({k: t.shape for k, t in tensors.items()}, expected, source=str(path))
    embedding = tensors["model.embeddings.tok_embeddings.weight"]
    for name in TIED_HF_NAMES:
        if name in tensors and not np.array_equal(tensors[name], embedding):
            raise CheckpointError(f"{path}: {name} differs from the token embedding; untied "
                                  f"output embeddings are not supported")
    params = from_hf_tensors({k: np.asarray(t, np.float32) for k, t in tensors.items()},
                             config, objective)
    tokenizer_dir = path if tokenizer_file_names(path) else None
    special_tokens = with_tokenizer_ids(special_tokens, tokenizer_dir)
    return PretrainedModel(model_from_params(config, objective, params), special_tokens,
                           tokenizer_dir)


def write_hf_weights(path: Path, params: dict, config, objective: str, *,
                     rules=None) -> tuple[dict[str, np.ndarray], int]:
    """Writes `params` ({native path: array}) as path/model.safetensors under HuggingFace
    names (the one key map, `keymap.to_hf_tensors`, with `rules` when given; `path` is
    created), atomically. Returns (tensors, elements written). Raises ValueError when the
    tensors do not hold every parameter element exactly once."""
    tensors = to_hf_tensors(params, config, objective, rules=rules)
    model_params = sum(value.size for value in params.values())
    elements = sum(t.size for t in tensors.values())
    if elements != model_params:
        raise ValueError(f"export wrote {elements:,} elements for {model_params:,} parameters")
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    return tensors, elements


def read_hf_config(path: Path) -> dict:
    """config.json of the HuggingFace directory `path` as a dict. Raises CheckpointError naming
    what is wrong (not a directory, no config.json, invalid JSON, not an object)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a HuggingFace model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: invalid JSON: {err}") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return hf_config


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards its index lists."""
    index = path / WEIGHTS_INDEX_FILE
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with storage.local_copy(file) as local:  # safetensors reads local files only
                tensors.update(load_file(local))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: cannot read safetensors: {err}") from None
    return tensors


def with_tokenizer_ids(special: SpecialTokens, tokenizer_dir: Path | None) -> SpecialTokens:
    """Fills the [MASK] and [UNK] ids from tokenizer.json when the directory has one."""
    tokenizer_file = None if tokenizer_dir is None else tokenizer_dir / "tokenizer.json"
    if tokenizer_file is None or not tokenizer_file.is_file():
        return special
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_file.read_text())
    ids = {name: tokenizer.token_to_id(token) for name, token in (("mask", "[MASK]"),
                                                                    ("unk", "[UNK]"))}
    return dataclasses.replace(special, **{k: v for k, v in ids.items() if v is not None})
