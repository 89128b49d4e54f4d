"""Retrieval fine-tuning tasks: what to train on and evaluate with (`RetrievalSource`), and the
contrastive (bi-encoder) settings (`RetrievalTaskSpec`).

Presets (`RETRIEVAL_PRESETS`):
- `bundled-code-search`: docstring -> code search over the Python standard library, built
  offline from the bundled corpus (`data_pipelines.retrieval_data.code_search_triplets` /
  `code_search_eval_set`), with settings for the tiny members on CPU.
- `msmarco`: Ettin's MS MARCO fine-tuning (JHU-CLSP/ettin-encoder-vs-decoder
  retrieval_eval/train_st.py) on triplets the user gives (`train_path=FILE`: a JSONL or
  Parquet copy of sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1
  "triplet-hard", fields query, positive, negative; ettin-jax never downloads).

`resolve_retrieval_task` is what a command line calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ettin_jax.finetune.retrieval_metrics import SIMILARITIES, parse_metric
from ettin_jax.finetune.tasks import (
    TASK_FILE_SUFFIXES,
    _check,
    _is_none,
    _parse,
    read_task_file,
)

RetrievalSourceKind = Literal["bundled", "triplets", "beir"]
RETRIEVAL_SOURCE_KINDS = ("bundled", "triplets", "beir")


@dataclasses.dataclass(frozen=True)
class RetrievalSource:
    """Where a retrieval task's training triplets or evaluation set come from.

    kind "bundled": `name` is a task built from the bundled corpus ("code-search"): its
      training triplets as a train source, its validation set as an eval source.
    kind "triplets": `path` is a JSONL or Parquet file of triplets (`format` "auto" by suffix,
      "jsonl" or "parquet"), read with `query_field`, `positive_field` and `negatives_field`
      (`data_pipelines.retrieval_data.read_triplets`); as an eval source, each triplet's query
      is ranked against all the file's documents (`eval_set_from_triplets`). `path` None: to
      be given (`train_path=` / `eval_path=` overrides).
    kind "beir": `path` is a directory in BEIR's layout, `split` the qrels split
      (`read_eval_set`); an eval source only.
    """

    kind: RetrievalSourceKind
    name: str = ""
    path: str | None = None
    split: str = "test"
    format: str = "auto"
    query_field: str = "query"
    positive_field: str = "positive"
    negatives_field: str | None = "negatives"

    def __post_init__(self) -> None:
        _check(self.kind in RETRIEVAL_SOURCE_KINDS, f"retrieval source kind must be one of "
                                                    f"{RETRIEVAL_SOURCE_KINDS}, got {self.kind!r}")
        _check(self.kind != "bundled" or bool(self.name), "a bundled source needs a name")
        _check(bool(self.query_field) and bool(self.positive_field),
               "query_field and positive_field must not be empty")

    def describe(self) -> str:
        """A short human-readable account: "bundled code-search", "triplets /data/t.jsonl",
        "beir /data/scifact (test)"."""
        if self.kind == "bundled":
            return f"bundled {self.name}"
        where = self.path or "<path not given>"
        return f"beir {where} ({self.split})" if self.kind == "beir" else f"triplets {where}"


@dataclasses.dataclass(frozen=True)
class RetrievalTaskSpec:
    """A retrieval task and how to fine-tune a bi-encoder on it (contrastive, in-batch plus
    hard negatives: sentence-transformers' CachedMultipleNegativesRankingLoss).

    train: the training triplets' source. eval: the evaluation set's source; None: the
      `eval_holdout` triplets held out of train (`holdout_split` with `holdout_seed`, as
      datasets' train_test_split(test_size, seed)), ranked as `eval_set_from_triplets` does.
    max_train_examples: train on the first this many of the (remaining) triplets; None: all.
    Settings (defaults: Ettin's retrieval_eval/train_st.py with the Trainer defaults it
      leaves unset):
    epochs, batch_size: passes over the triplets, triplets per optimizer step (each query's
      in-batch negatives are the batch's other documents).
    mini_batch_size: triplets per forward/backward chunk of the cached (GradCache) loss: it
      bounds memory, not the gradient.
    no_duplicates: batches never hold the same text twice (sentence-transformers'
      BatchSamplers.NO_DUPLICATES), so no in-batch negative is a copy of the positive.
    learning_rate: peak; linear warmup over `warmup_fraction` of the steps, then linear
      decay to `final_lr_fraction` of it (transformers' "linear" schedule).
    weight_decay, adam_b1, adam_b2, adam_eps: torch AdamW's (transformers' defaults:
      0, 0.9, 0.999, 1e-8); max_grad_norm: clip the global gradient norm (None: no clip).
    scale: the loss's logit scale (inverse temperature) on the `similarity` of embeddings.
    similarity: "cosine" or "dot", for the loss and for ranking the evaluation corpus.
    max_query_length, max_document_length: tokens per text with the special tokens.
    encoder_pooling, decoder_pooling: how each member's hidden states become one embedding
      (`ettin_jax.models.embedding`; Ettin: "mean" for the encoder, sentence-transformers'
      default, and "lasttoken" for the decoder).
    metrics: `ettin_jax.finetune.retrieval_metrics` names ("ndcg@10"); the first is the
      headline.
    seeds: the fine-tuning seeds of a sweep.
    """

    name: str
    train: RetrievalSource
    eval: RetrievalSource | None = None
    eval_holdout: int = 0
    holdout_seed: int = 12
    max_train_examples: int | None = None
    epochs: int = 1
    batch_size: int = 1024
    mini_batch_size: int = 256
    no_duplicates: bool = True
    learning_rate: float = 3e-4
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    scale: float = 20.0
    similarity: str = "cosine"
    max_query_length: int = 64
    max_document_length: int = 512
    encoder_pooling: str = "mean"
    decoder_pooling: str = "lasttoken"
    metrics: tuple[str, ...] = ("ndcg@10", "mrr@10", "recall@100")
    seeds: tuple[int, ...] = (42,)

    def __post_init__(self) -> None:
        from ettin_jax.models.embedding import check_embedding_pooling

        for name in ("metrics", "seeds"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        name = self.name
        _check(bool(name), "name must not be empty")
        _check(self.train.kind != "beir",
               f"task {name}: a beir source is an evaluation set, not training triplets")
        if self.eval is None:
            _check(self.eval_holdout >= 1, f"task {name}: give an eval source or "
                                           f"eval_holdout >= 1 triplets to hold out of train")
        else:
            _check(self.eval_holdout == 0, f"task {name}: give an eval source or "
                                           f"eval_holdout, not both")
        _check(self.eval_holdout >= 0,
               f"task {name}: eval_holdout must be >= 0, got {self.eval_holdout}")
        _check(self.max_train_examples is None or self.max_train_examples >= 1,
               f"task {name}: max_train_examples must be >= 1 or None, got "
               f"{self.max_train_examples}")
        for field in ("epochs", "batch_size", "mini_batch_size"):
            _check(getattr(self, field) >= 1,
                   f"task {name}: {field} must be >= 1, got {getattr(self, field)}")
        _check(self.batch_size % self.mini_batch_size == 0,
               f"task {name}: batch_size {self.batch_size} must be a multiple of "
               f"mini_batch_size {self.mini_batch_size}")
        _check(self.learning_rate > 0,
               f"task {name}: learning_rate must be > 0, got {self.learning_rate}")
        _check(0 <= self.warmup_fraction < 1,
               f"task {name}: warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        _check(0 <= self.final_lr_fraction <= 1, f"task {name}: final_lr_fraction must be in "
                                                 f"[0, 1], got {self.final_lr_fraction}")
        _check(self.weight_decay >= 0,
               f"task {name}: weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"task {name}: max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        _check(self.scale > 0, f"task {name}: scale must be > 0, got {self.scale}")
        _check(self.similarity in SIMILARITIES, f"task {name}: similarity must be one of "
                                                f"{', '.join(SIMILARITIES)}, got "
                                                f"{self.similarity!r}")
        for field in ("max_query_length", "max_document_length"):
            _check(getattr(self, field) >= 4,
                   f"task {name}: {field} must be >= 4, got {getattr(self, field)}")
        try:
            check_embedding_pooling("mlm", self.encoder_pooling)
            check_embedding_pooling("clm", self.decoder_pooling)
        except ValueError as err:
            raise ValueError(f"task {name}: {err}") from None
        _check(len(self.metrics) >= 1, f"task {name}: metrics must name at least one")
        for metric in self.metrics:
            try:
                parse_metric(metric)
            except ValueError as err:
                raise ValueError(f"task {name}: {err}") from None
        _check(len(self.seeds) >= 1, f"task {name}: seeds must list at least one")

    @property
    def headline(self) -> str:
        """The metric a sweep reports first (metrics[0])."""
        return self.metrics[0]

    @property
    def k_values(self) -> tuple[int, ...]:
        """The cutoffs of `metrics`, ascending (for `retrieval_metrics`)."""
        return tuple(sorted({parse_metric(metric)[1] for metric in self.metrics}))

    @property
    def top_k(self) -> int:
        """Documents to rank per query (`rank_corpus`): the largest cutoff."""
        return max(self.k_values)

    def pooling(self, objective: str) -> str:
        """The pooling of the member trained with `objective` ("mlm" or "clm")."""
        if objective not in ("mlm", "clm"):
            raise ValueError(f"unknown objective {objective!r}; valid: mlm, clm")
        return self.encoder_pooling if objective == "mlm" else self.decoder_pooling


# --- presets -----------------------------------------------------------------------------------

BUNDLED_CODE_SEARCH = RetrievalTaskSpec(
    name="bundled-code-search", train=RetrievalSource("bundled", "code-search"),
    eval=RetrievalSource("bundled", "code-search"), epochs=1, batch_size=64,
    mini_batch_size=16, learning_rate=3e-4, max_query_length=64, max_document_length=256,
    metrics=("ndcg@10", "mrr@10", "recall@10", "recall@100"))
"""Docstring -> code search over the Python standard library (`data_pipelines.retrieval_data`):
a function's docstring (first paragraph, <= 120 characters) asks for its code (<= 450
characters, docstring removed), split by module; on Python 3.11, 2000 training triplets (one
hard negative: the next function of the same module) and 355 validation queries against the
355 validation functions' code. Settings for the tiny members on CPU: 1 epoch of 31 steps of 64
triplets in mini-batches of 16, queries <= 64 tokens and code <= 256 (with `make demo`'s
1024-piece tokenizer, 99% of the queries fit 63 tokens and of the code 248), Ettin's learning
rate, warmup and scale."""

MSMARCO = RetrievalTaskSpec(
    name="msmarco",
    train=RetrievalSource("triplets", query_field="query", positive_field="positive",
                          negatives_field="negative"),
    eval=None, eval_holdout=1000, holdout_seed=12, max_train_examples=1_250_000)
"""Ettin's MS MARCO fine-tuning (retrieval_eval/train_st.py) on the user's copy of
sentence-transformers' msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1 "triplet-hard"
(`train_path=FILE`): 1000 triplets held out with seed 12, the first 1.25M of the rest, 1 epoch
in batches of 1024 triplets in mini-batches of 256 (CachedMNRL), scale 20, cosine, warmup 5%
then linear decay, AdamW with transformers' defaults, gradient clipping 1.0, learning rate 3e-4
(the README's example for the 17m members; the script takes it as --lr), mean pooling for the
encoder and last-token for the decoder. Ettin scored the held-out triplets with a
TripletEvaluator (is the positive closer than the negative?); here they are ranked as an IR
set (each query against all 2000 held-out passages). Ettin sets no maximum length
(sentence-transformers then cuts at the model's 7999 tokens); 64 and 512 here bound padding."""

RETRIEVAL_PRESETS: dict[str, RetrievalTaskSpec] = {
    BUNDLED_CODE_SEARCH.name: BUNDLED_CODE_SEARCH, MSMARCO.name: MSMARCO}


# --- overrides, task files and the command line ------------------------------------------------

_INTS = {"eval_holdout", "holdout_seed", "max_train_examples", "epochs", "batch_size",
         "mini_batch_size", "max_query_length", "max_document_length"}
_FLOATS = {"learning_rate", "warmup_fraction", "final_lr_fraction", "weight_decay", "adam_b1",
           "adam_b2", "adam_eps", "max_grad_norm", "scale"}
_TUPLES = {"metrics", "seeds"}
_OPTIONAL = {"max_train_examples", "max_grad_norm", "negatives_field"}
_BOOLS = {"no_duplicates"}
_SETTINGS = {f.name for f in dataclasses.fields(RetrievalTaskSpec)} - {"name", "train", "eval"}
# Keys that change the sources: train_path (a triplets file), eval_path (a BEIR directory or a
# triplets file), eval_split (the BEIR qrels split) and the triplet fields and format.
_SOURCE_KEYS = {"train_path", "eval_path", "eval_split", "query_field", "positive_field",
                "negatives_field", "format"}
RETRIEVAL_OVERRIDE_KEYS = tuple(sorted(_SETTINGS | _SOURCE_KEYS | {"name"}))


def _parse_setting(key: str, value: Any) -> Any:
    if key in _BOOLS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"task setting {key}={value!r}: not a boolean (true or false)")
    return _parse(key, value, ints=_INTS, floats=_FLOATS, tuples=_TUPLES, optional=_OPTIONAL)


def apply_retrieval_overrides(spec: RetrievalTaskSpec, overrides: Mapping[str, Any],
                              base_dir: str | Path | None = None) -> RetrievalTaskSpec:
    """`spec` with `overrides` {key: value} applied: RetrievalTaskSpec fields other than the
    sources (epochs, learning_rate, seeds, ...), and
      train_path: train on this triplets file (JSONL or Parquet);
      eval_path: evaluate on this BEIR directory, or on this triplets file's triplets (then
        eval_holdout becomes 0);
      eval_split: the BEIR qrels split; query_field, positive_field, negatives_field ("none":
        in-batch negatives only), format: of the triplets sources.
    Values may be typed or strings as a command line gives them ("3", "1e-5", "19,8364",
    "none", "false"); relative paths are taken from `base_dir`. Raises ValueError naming an
    unknown key or a value that does not parse."""
    changes: dict[str, Any] = {}
    train, evaluation = spec.train, spec.eval
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _SETTINGS or key == "name":
            changes[key] = _parse_setting(key, value)
        elif key in ("query_field", "positive_field", "format"):
            fields[key] = str(value)
        elif key == "negatives_field":
            fields[key] = None if _is_none(value) else str(value)
        elif key == "train_path":
            train = dataclasses.replace(_as_triplets(train), path=_local(value, base_dir))
        elif key == "eval_path":
            path = _local(value, base_dir)
            if Path(path).is_dir():
                evaluation = RetrievalSource("beir", path=path, split=(
                    evaluation.split if evaluation is not None else "test"))
            else:
                evaluation = dataclasses.replace(_as_triplets(train), path=path)
            changes.setdefault("eval_holdout", 0)
        elif key == "eval_split":
            if evaluation is None or evaluation.kind != "beir":
                raise ValueError(f"task {spec.name}: eval_split applies to a BEIR eval source "
                                 f"(set eval_path=DIR first)")
            evaluation = dataclasses.replace(evaluation, split=str(value))
        else:
            raise ValueError(f"unknown retrieval task setting {key!r}; valid: "
                             f"{', '.join(RETRIEVAL_OVERRIDE_KEYS)}")
    if fields:
        if train.kind != "triplets":
            raise ValueError(f"task {spec.name}: {', '.join(fields)} apply to triplets "
                             f"sources; this task trains on {train.describe()}")
        train = dataclasses.replace(train, **fields)
        if evaluation is not None and evaluation.kind == "triplets":
            evaluation = dataclasses.replace(evaluation, **fields)
    return dataclasses.replace(spec, train=train, eval=evaluation, **changes)


def _as_triplets(source: RetrievalSource) -> RetrievalSource:
    return source if source.kind == "triplets" else RetrievalSource("triplets")


def _local(path: Any, base_dir: str | Path | None) -> str:
    path = Path(str(path)).expanduser()
    return str(Path(base_dir) / path if base_dir is not None and not path.is_absolute()
               else path)


def resolve_retrieval_task(name_or_path: str,
                           overrides: Mapping[str, Any] | None = None) -> RetrievalTaskSpec:
    """The retrieval task a command line names, with `overrides` applied
    (`apply_retrieval_overrides`).

    name_or_path: a preset name (`RETRIEVAL_PRESETS`: bundled-code-search, msmarco) or a task
    file (.yaml, .yml or .json) holding a mapping of overrides, optionally starting from a
    preset (default: msmarco's settings), paths relative to the file:

        preset: msmarco
        train_path: msmarco-triplets.parquet
        eval_path: beir/msmarco          # a BEIR directory; default: 1000 held-out triplets
        eval_split: dev
        batch_size: 512

    `name` defaults to the file's stem. Raises ValueError naming an unknown task, a missing
    file, a bad setting, or a triplets source without a path (e.g. msmarco without
    train_path)."""
    overrides = dict(overrides or {})
    if name_or_path in RETRIEVAL_PRESETS:
        spec = apply_retrieval_overrides(RETRIEVAL_PRESETS[name_or_path], overrides)
    else:
        path = Path(name_or_path)
        if path.suffix.lower() not in TASK_FILE_SUFFIXES:
            raise ValueError(f"unknown retrieval task {name_or_path!r}: not a preset "
                             f"({', '.join(RETRIEVAL_PRESETS)}) nor a task file "
                             f"({', '.join(TASK_FILE_SUFFIXES)})")
        mapping = read_task_file(path)
        preset = str(mapping.pop("preset", MSMARCO.name))
        if preset not in RETRIEVAL_PRESETS:
            raise ValueError(f"task file {path}: unknown preset {preset!r}; valid: "
                             f"{', '.join(RETRIEVAL_PRESETS)}")
        try:
            spec = apply_retrieval_overrides(RETRIEVAL_PRESETS[preset],
                                             {"name": path.stem, **mapping}, path.parent)
        except ValueError as err:
            raise ValueError(f"task file {path}: {err}") from None
        spec = apply_retrieval_overrides(spec, overrides)
    for role, source in (("train", spec.train), ("eval", spec.eval)):
        if source is not None and source.kind in ("triplets", "beir") and not source.path:
            raise ValueError(f"task {spec.name}: the {role} source ({source.kind}) has no path; "
                             f"set {role}_path=...")
    return spec
