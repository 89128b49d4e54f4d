"""Fine-tuning tasks: what to read (`TaskSource`), which fields are the texts and the label, the
label names (or regression), the metrics, and the fine-tuning settings (`TaskSpec`).

Presets (`PRESETS`): the eight GLUE tasks as bert24's `src/evals/glue_jobs.py` fine-tunes Ettin
(the code behind the paper's GLUE numbers: DecoupledAdamW betas (0.9, 0.98), eps 1e-6, linear
decay to 0 after 6% warmup, max length 256, bert24's seeds, RTE/MRPC/STS-B started from the
MNLI checkpoint), read from prepared TFDS copies (`glue/<task>`, see
`data_pipelines.task_data.open_tfds`), and `bundled-genre`, a task built offline from the
bundled corpus (`data_pipelines.bundled_task`). `resolve_task` is what a command line calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ettin_jax.finetune.metrics import CLASSIFICATION_METRICS, METRICS, REGRESSION_METRICS

SourceKind = Literal["tfds", "files", "bundled"]
SOURCE_KINDS = ("tfds", "files", "bundled")
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """Where a task's examples come from.

    kind "tfds": `name` is a TFDS dataset ("glue/mrpc"), `data_dir` the directory it was
      prepared into (array_record format; None: TFDS's default, $TFDS_DATA_DIR or
      ~/tensorflow_datasets). Never downloaded.
    kind "files": `files` maps each split to a local file ((split, path) pairs); `format` is
      "auto" (by suffix: .tsv, .csv, .jsonl/.json, .parquet) or one of those; `columns` names
      the columns of TSV/CSV files without a header row.
    kind "bundled": `name` is a task built from the bundled corpus ("genre").
    """

    kind: SourceKind
    name: str = ""
    data_dir: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    format: str = "auto"
    columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        files = self.files.items() if isinstance(self.files, Mapping) else self.files
        object.__setattr__(self, "files", tuple((str(s), str(p)) for s, p in files))
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        if self.kind == "files" and not self.files:
            raise ValueError("a files source needs files: {split: path}")
        if self.kind != "files" and not self.name:
            raise ValueError(f"a {self.kind} source needs a name")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A sequence classification or regression task and how to fine-tune on it.

    text_field / pair_field / label_field: the fields (TFDS features, columns, JSON keys)
      holding the text, the optional second text of a pair, and the label.
    labels: class names in index order (a label in the data is a name, or its index); None:
      regression, one float output.
    metrics: names from `ettin_jax.finetune.metrics.METRICS`; the first is the headline.
    train_split / dev_split: the splits to train on and to report; extra_dev_splits: more
      splits evaluated like dev_split (MNLI's validation_mismatched).
    Settings (defaults: bert24's ClassificationJob with SST-2's optimizer):
    epochs, batch_size: passes over train_split, examples per step (drop_last False).
    learning_rate: peak; linear warmup over `warmup_fraction` of the steps, then linear decay
      to `final_lr_fraction` of it (Composer's linear_decay_with_warmup, t_warmup 0.06dur,
      alpha_f 0).
    weight_decay: decoupled as Composer's DecoupledAdamW: each step multiplies the weights by
      1 - weight_decay * lr_t / learning_rate (so optax.adamw's equivalent is
      weight_decay / learning_rate); adam_b1, adam_b2, adam_eps: its moments.
    max_length: tokens per example with the special tokens (longer inputs are truncated).
    seeds: the fine-tuning seeds of a sweep (bert24's per task).
    init_from_task: start from this task's fine-tuned checkpoint rather than the pretrained
      model (bert24 starts RTE, MRPC and STS-B from MNLI); None: the pretrained model.
    """

    name: str
    source: TaskSource
    text_field: str
    pair_field: str | None = None
    label_field: str = "label"
    labels: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    train_split: str = "train"
    dev_split: str = "validation"
    extra_dev_splits: tuple[str, ...] = ()
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 3e-5
    weight_decay: float = 3e-6
    warmup_fraction: float = 0.06
    final_lr_fraction: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-6
    max_length: int = 256
    seeds: tuple[int, ...] = (19,)
    init_from_task: str | None = None

    def __post_init__(self) -> None:
        for name in ("labels", "metrics", "extra_dev_splits", "seeds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        _check(bool(self.name), "name must not be empty")
        _check(bool(self.text_field), f"task {self.name}: text_field must not be empty")
        _check(bool(self.label_field), f"task {self.name}: label_field must not be empty")
        if self.labels is not None:
            _check(len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels),
                   f"task {self.name}: labels must be 2 or more distinct names, got "
                   f"{self.labels}")
        _check(len(self.metrics) >= 1, f"task {self.name}: metrics must name at least one")
        for metric in self.metrics:
            _check(metric in METRICS, f"task {self.name}: unknown metric {metric!r}; valid: "
                                      f"{', '.join(METRICS)}")
            allowed = REGRESSION_METRICS if self.labels is None else CLASSIFICATION_METRICS
            _check(metric in allowed, f"task {self.name}: metric {metric!r} does not apply to "
                                      f"{'regression' if self.labels is None else 'classes'}; "
                                      f"use {', '.join(allowed)}")
        if "f1" in self.metrics:
            _check(self.labels is not None and len(self.labels) == 2,
                   f"task {self.name}: metric 'f1' needs exactly 2 labels (positive: index 1)")
        _check(self.epochs >= 1, f"task {self.name}: epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1,
               f"task {self.name}: batch_size must be >= 1, got {self.batch_size}")
        _check(self.learning_rate > 0,
               f"task {self.name}: learning_rate must be > 0, got {self.learning_rate}")
        _check(self.weight_decay >= 0,
               f"task {self.name}: weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_fraction < 1,
               f"task {self.name}: warmup_fraction must be in [0, 1), got "
               f"{self.warmup_fraction}")
        _check(0 <= self.final_lr_fraction <= 1,
               f"task {self.name}: final_lr_fraction must be in [0, 1], got "
               f"{self.final_lr_fraction}")
        _check(self.max_length >= 8,
               f"task {self.name}: max_length must be >= 8, got {self.max_length}")
        _check(len(self.seeds) >= 1, f"task {self.name}: seeds must list at least one")
        if self.source.kind == "files":
            files = dict(self.source.files)
            for split in (self.train_split, self.dev_split, *self.extra_dev_splits):
                _check(split in files, f"task {self.name}: no file for split {split!r} "
                                       f"(files for: {', '.join(files)})")

    @property
    def num_labels(self) -> int:
        """Outputs of the head: the number of classes, 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts one real value (labels None)."""
        return self.labels is None

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """dev_split, then extra_dev_splits."""
        return (self.dev_split, *self.extra_dev_splits)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --- presets -----------------------------------------------------------------------------------

GLUE_SEEDS_5 = (19, 8364, 717, 10536, 90166)


def _glue(name: str, text: str, pair: str | None, labels: tuple[str, ...] | None,
          metrics: tuple[str, ...], **settings) -> TaskSpec:
    return TaskSpec(name=name, source=TaskSource("tfds", f"glue/{name}"), text_field=text,
                    pair_field=pair, labels=labels, metrics=metrics, max_length=256, **settings)


# Fields and label names are TFDS's glue/<task> features; metrics as GLUE reports them (bert24
# logs MRPC/QQP accuracy first and only Spearman for STS-B); settings from bert24's glue_jobs.py
# (MNLI: 3 epochs at batch 48, as that file says; docs/fidelity.md).
GLUE_TASKS: dict[str, TaskSpec] = {
    task.name: task for task in (
        _glue("cola", "sentence", None, ("unacceptable", "acceptable"), ("matthews",),
              epochs=10, batch_size=32, learning_rate=5e-5, weight_decay=5e-6,
              seeds=(19, 8364, 717, 10536)),
        _glue("sst2", "sentence", None, ("negative", "positive"), ("accuracy",),
              epochs=3, batch_size=16, learning_rate=3e-5, weight_decay=3e-6,
              seeds=(19, 8364, 717)),
        _glue("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"),
              ("f1", "accuracy"), epochs=10, batch_size=32, learning_rate=8e-5,
              weight_decay=8e-6, seeds=GLUE_SEEDS_5, init_from_task="mnli"),
        _glue("qqp", "question1", "question2", ("not_duplicate", "duplicate"),
              ("f1", "accuracy"), epochs=5, batch_size=16, learning_rate=3e-5,
              weight_decay=3e-6),
        _glue("stsb", "sentence1", "sentence2", None, ("pearson", "spearman"),
              epochs=10, batch_size=32, learning_rate=3e-5, weight_decay=3e-6,
              seeds=GLUE_SEEDS_5, init_from_task="mnli"),
        _glue("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
              ("accuracy",), dev_split="validation_matched",
              extra_dev_splits=("validation_mismatched",), epochs=3, batch_size=48,
              learning_rate=5e-5, weight_decay=5e-6),
        _glue("qnli", "question", "sentence", ("entailment", "not_entailment"), ("accuracy",),
              epochs=10, batch_size=16, learning_rate=1e-5, weight_decay=1e-6),
        _glue("rte", "sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",),
              epochs=3, batch_size=16, learning_rate=1e-5, weight_decay=1e-5,
              seeds=GLUE_SEEDS_5, init_from_task="mnli"),
    )
}

BUNDLED_GENRE = TaskSpec(
    name="bundled-genre", source=TaskSource("bundled", "genre"), text_field="text",
    labels=("comedy", "history", "tragedy"), metrics=("accuracy", "matthews"),
    epochs=3, batch_size=32, learning_rate=1e-3, weight_decay=3e-5, max_length=128,
    seeds=(19, 8364, 717))
"""Which genre (comedy, history, tragedy) a passage of 100-200 characters comes from: 34
plays of the bundled corpus split by play, 25 for training, 9 for validation
(`data_pipelines.bundled_task`); 1800 train and 540 validation examples, exactly balanced:
majority-class accuracy 1/3 (Matthews 0); a TF-IDF bag of words reaches 0.56. Settings for
the tiny members on CPU: 3 epochs of 57 steps of 32 at max length 128, learning rate 1e-3 (a
tiny model pretrained briefly needs a larger one than GLUE's 1e-5..8e-5). The demo's pair
(`make demo`) reached 0.44 (encoder, cls pooling) and 0.41 (decoder, last token) with these,
3e-4 gave 0.39 / 0.42, and mean pooling for both at 1e-3 over 5 epochs 0.52 / 0.51."""

PRESETS: dict[str, TaskSpec] = {**GLUE_TASKS, BUNDLED_GENRE.name: BUNDLED_GENRE}


# --- tasks from files, mappings and the command line --------------------------------------------


def task_from_files(name: str, files: Mapping[str, str | Path], *, text_field: str,
                    pair_field: str | None = None, label_field: str = "label",
                    labels: Sequence[str] | None = None, regression: bool = False,
                    metrics: Sequence[str] | None = None, format: str = "auto",
                    columns: Sequence[str] | None = None, **settings) -> TaskSpec:
    """A task read from local files: `files` maps splits ("train", "validation", ...) to TSV,
    CSV, JSONL or Parquet files (see `data_pipelines.task_data`). `labels`: the class names
    in index order; None infers them from the train split's labels, sorted (numerically when
    all are integers); `regression=True`: a float target instead. `metrics` defaults to
    accuracy (and F1 for two classes), or Pearson and Spearman for regression. `settings` are
    the other TaskSpec fields (epochs, dev_split, ...). Raises ValueError (TaskDataError when
    the labels cannot be inferred) naming what is wrong."""
    from data_pipelines.task_data import infer_labels

    source = TaskSource("files", files=tuple((str(s), str(p)) for s, p in files.items()),
                        format=format, columns=None if columns is None else tuple(columns))
    if regression:
        if labels is not None:
            raise ValueError(f"task {name}: give labels or regression=True, not both")
    elif labels is None:
        train_split = settings.get("train_split", "train")
        if train_split not in dict(source.files):
            raise ValueError(f"task {name}: no file for split {train_split!r} to infer the "
                             f"labels from (files for: {', '.join(dict(source.files))})")
        labels = infer_labels(dict(source.files)[train_split], label_field, format, columns)
    if metrics is None:
        metrics = (("pearson", "spearman") if regression else
                   ("accuracy", "f1") if len(labels) == 2 else ("accuracy",))
    return TaskSpec(name=name, source=source, text_field=text_field, pair_field=pair_field,
                    label_field=label_field, labels=None if regression else tuple(labels),
                    metrics=tuple(metrics), **settings)


_SETTINGS = {f.name for f in dataclasses.fields(TaskSpec)} - {"name", "source"}
_INTS = {"epochs", "batch_size", "max_length"}
_FLOATS = {"learning_rate", "weight_decay", "warmup_fraction", "final_lr_fraction", "adam_b1",
           "adam_b2", "adam_eps"}
_TUPLES = {"labels", "metrics", "extra_dev_splits", "seeds"}
_OPTIONAL = {"pair_field", "labels", "init_from_task"}
OVERRIDE_KEYS = tuple(sorted(_SETTINGS | {"name", "data_dir"}))


def apply_overrides(spec: TaskSpec, overrides: Mapping[str, Any]) -> TaskSpec:
    """`spec` with `overrides` {key: value} applied. Keys: TaskSpec fields other than source
    (epochs, learning_rate, seeds, ...), and `data_dir` (a TFDS source's data directory).
    Values may be typed or strings as a command line gives them ("3", "1e-5", "19,8364",
    "none"). Raises ValueError naming an unknown key or a value that does not parse."""
    changes: dict[str, Any] = {}
    source = spec.source
    for key, value in overrides.items():
        if key == "data_dir":
            if source.kind != "tfds":
                raise ValueError(f"task {spec.name}: data_dir applies to TFDS sources, this one "
                                 f"is {source.kind}")
            source = dataclasses.replace(source, data_dir=None if _is_none(value) else
                                         str(value))
        elif key in _SETTINGS or key == "name":
            changes[key] = _parse(key, value)
        else:
            raise ValueError(f"unknown task setting {key!r}; valid: {', '.join(OVERRIDE_KEYS)}")
    return dataclasses.replace(spec, source=source, **changes)


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null"))


def _parse(key: str, value: Any, *, ints: frozenset | set = _INTS,
           floats: frozenset | set = _FLOATS, tuples: frozenset | set = _TUPLES,
           optional: frozenset | set = _OPTIONAL) -> Any:
    """`value` of setting `key` as its type: an int, float or tuple (seeds: of ints) when `key`
    is in `ints`, `floats` or `tuples` (TaskSpec's by default; the retrieval tasks pass
    theirs), None for "none"/"null" when in `optional`, else a str."""
    try:
        if key in optional and _is_none(value):
            return None
        if key in tuples:
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [item.strip() if isinstance(item, str) else item for item in items]
            return tuple(int(item) for item in items) if key == "seeds" else \
                tuple(str(item) for item in items if item != "")
        if key in ints:
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if key in floats:
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"task setting {key}={value!r}: {err}") from None


def task_from_mapping(mapping: Mapping[str, Any], base_dir: str | Path | None = None) -> TaskSpec:
    """A task from a mapping as a task file holds it (see `resolve_task`): `preset` (optional:
    start from it), `source` ({"tfds": NAME, "data_dir": DIR} | {"files": {SPLIT: PATH},
    "format": ..., "columns": [...]} | {"bundled": NAME}), `regression` (files without a
    preset), and TaskSpec fields. Relative file paths and data_dir are taken from `base_dir`.
    Raises ValueError naming what is missing or wrong."""
    mapping = dict(mapping)
    preset = mapping.pop("preset", None)
    source_map = mapping.pop("source", None)
    regression = bool(mapping.pop("regression", False))
    source = None if source_map is None else _source(source_map, base_dir)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        if source is not None:
            spec = dataclasses.replace(spec, source=source)
        return apply_overrides(spec, mapping)
    if source is None:
        raise ValueError("a task needs a source (or a preset)")
    for key in mapping:
        if key not in _SETTINGS and key != "name":
            raise ValueError(f"unknown task setting {key!r}; valid: "
                             f"{', '.join(sorted(_SETTINGS | {'name', 'preset', 'source'}))}")
    fields = {key: _parse(key, value) for key, value in mapping.items()}
    name = fields.pop("name", None) or "task"
    if "text_field" not in fields:
        raise ValueError(f"task {name}: text_field is missing")
    if source.kind == "files":
        return task_from_files(name, dict(source.files), regression=regression,
                               format=source.format, columns=source.columns, **fields)
    return TaskSpec(name=name, source=source, **fields)


def _source(mapping: Any, base_dir: str | Path | None) -> TaskSource:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"source must be a mapping, got {mapping!r}")
    mapping = dict(mapping)
    base = Path(base_dir) if base_dir is not None else None

    def local(path: Any) -> str:
        path = Path(str(path)).expanduser()
        return str(base / path if base is not None and not path.is_absolute() else path)

    kinds = [kind for kind in SOURCE_KINDS if kind in mapping]
    if len(kinds) != 1:
        raise ValueError(f"source must name exactly one of {', '.join(SOURCE_KINDS)}, got "
                         f"{sorted(mapping)}")
    kind = kinds[0]
    value = mapping.pop(kind)
    allowed = {"tfds": {"data_dir"}, "files": {"format", "columns"}, "bundled": set()}[kind]
    extra = set(mapping) - allowed
    if extra:
        raise ValueError(f"source: unknown key {sorted(extra)[0]!r} for {kind} (valid: "
                         f"{', '.join(sorted(allowed)) or 'none'})")
    if kind == "files":
        if not isinstance(value, Mapping):
            raise ValueError("source files must map splits to paths")
        return TaskSource("files", files=tuple((str(s), local(p)) for s, p in value.items()),
                          format=mapping.get("format", "auto"), columns=mapping.get("columns"))
    if kind == "tfds":
        data_dir = mapping.get("data_dir")
        return TaskSource("tfds", str(value), data_dir=None if data_dir is None
                          else local(data_dir))
    return TaskSource("bundled", str(value))


def read_task_file(path: Path) -> dict[str, Any]:
    """The mapping a task file (.yaml, .yml or .json) holds. Raises ValueError naming the file
    when it is missing, not YAML/JSON, or not a mapping."""
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist")
    import yaml  # JSON is YAML

    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"task file {path}: not valid YAML/JSON: {err}") from None
    if not isinstance(mapping, Mapping):
        raise ValueError(f"task file {path}: must hold a mapping, got "
                         f"{type(mapping).__name__}")
    return dict(mapping)


def resolve_task(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    """The task a command line names, with `overrides` applied (`apply_overrides`).

    name_or_path: a preset name (`PRESETS`: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte,
    bundled-genre), or a task file (.yaml, .yml or .json) holding a mapping such as

        name: reviews                 # default: the file's stem
        source: {files: {train: train.jsonl, validation: dev.jsonl}}   # relative to the file
        text_field: review
        label_field: stars            # labels inferred from train unless given
        epochs: 5

    or `preset: mrpc` plus `source: {tfds: glue/mrpc, data_dir: /data/tfds}` and any settings
    to change (see `task_from_mapping`). overrides: e.g. {"data_dir": "/data/tfds",
    "epochs": "3"} from `--set key=value` options. Raises ValueError naming an unknown task,
    a missing file or a bad setting."""
    overrides = dict(overrides or {})
    if name_or_path in PRESETS:
        return apply_overrides(PRESETS[name_or_path], overrides)
    path = Path(name_or_path)
    if path.suffix.lower() in TASK_FILE_SUFFIXES:
        mapping = read_task_file(path)
        mapping = {"name": path.stem, **mapping} if "preset" not in mapping else dict(mapping)
        try:
            spec = task_from_mapping(mapping, base_dir=path.parent)
        except ValueError as err:
            raise ValueError(f"task file {path}: {err}") from None
        return apply_overrides(spec, overrides)
    raise ValueError(f"unknown task {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor "
                     f"a task file ({', '.join(TASK_FILE_SUFFIXES)})")
