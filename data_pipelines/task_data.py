"""Examples of a fine-tuning task (`ettin_jax.finetune.tasks.TaskSpec`): read from a prepared
TFDS dataset, local files or the bundled corpus, and encoded into fixed-length id arrays with
the members' special tokens (`data_pipelines.special_tokens.with_special_tokens`).

Local files, by suffix (or the source's `format`):
- .tsv: tab-separated, no quoting (quotes are text, as in GLUE's TSV files); first row is the
  header unless the source names `columns`.
- .csv: comma-separated with standard CSV quoting; header as for TSV.
- .jsonl / .json: one JSON object per line.
- .parquet: columns by name (pyarrow).
Labels: classification: a label name from the spec's `labels`, or, when no label name is itself
an integer, an integer index into them (GLUE's TSVs write SST-2's labels as 0/1); regression: a
finite number. Any problem raises `TaskDataError` naming the file, line (or row) and field.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines.sources import SourceError
from data_pipelines.special_tokens import with_special_tokens

if TYPE_CHECKING:
    from ettin_jax.finetune.tasks import TaskSpec

FILE_FORMATS = ("auto", "tsv", "csv", "jsonl", "parquet")
_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl",
             ".parquet": "parquet"}


class TaskDataError(SourceError):
    """A task's examples cannot be read; the message names the file, line (or row) and field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: `text`, the optional second text `pair`, the `label` (class index or
    regression target) and `where` it came from ("dev.tsv:12", "tfds glue/mrpc validation
    record 7", "data.parquet row 3"; lines and rows count from 1)."""

    text: str
    pair: str | None
    label: int | float
    where: str


# --- reading -----------------------------------------------------------------------------------


def read_examples(spec: TaskSpec, split: str) -> list[Example]:
    """The examples of `split` of the task `spec`, in the source's order.

    TFDS sources are opened with `tfds.builder(name, data_dir=...)` on an already prepared
    dataset in the array_record format (read without TensorFlow); nothing is ever downloaded.
    Raises TaskDataError for an unknown or empty split, a dataset that is not prepared, a
    missing field, an unknown label or a non-numeric regression label, naming where."""
    kind = spec.source.kind
    if kind == "tfds":
        examples = list(_tfds_examples(spec, split))
    elif kind == "files":
        files = dict(spec.source.files)
        if split not in files:
            raise TaskDataError(f"task {spec.name!r}: no file for split {split!r} (files for: "
                                f"{', '.join(files) or 'none'})")
        examples = list(_file_examples(spec, Path(files[split])))
    elif kind == "bundled":
        from data_pipelines import bundled_task

        try:
            examples = bundled_task.genre_examples(split)
        except ValueError as err:
            raise TaskDataError(f"task {spec.name!r}: {err}") from None
    else:
        raise TaskDataError(f"task {spec.name!r}: unknown source kind {kind!r}")
    if not examples:
        raise TaskDataError(f"task {spec.name!r}: split {split!r} ({_describe(spec, split)}) "
                            f"holds no examples")
    return examples


def _describe(spec: TaskSpec, split: str) -> str:
    source = spec.source
    if source.kind == "tfds":
        return f"tfds {source.name} in {source.data_dir or 'the default data_dir'}"
    if source.kind == "files":
        return str(dict(source.files).get(split))
    return f"bundled {source.name}"


def label_value(spec: TaskSpec, value: Any, where: str) -> int | float:
    """`value` (a label as a file holds it) as the spec's class index or regression target.
    Raises TaskDataError naming `where`, the field and the value when it is not one."""
    field = spec.label_field
    if spec.labels is None:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise TaskDataError(f"{where}: field {field!r}: regression label {value!r} is not "
                                f"a finite number")
        return number
    names = spec.labels
    text = str(value) if not isinstance(value, float) or not value.is_integer() \
        else str(int(value))
    if text in names:
        return names.index(text)
    if not any(_is_int(name) for name in names) and _is_int(text) \
            and 0 <= int(text) < len(names):
        return int(text)
    raise TaskDataError(f"{where}: field {field!r}: unknown label {value!r} (labels: "
                        f"{', '.join(names)})")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _make(spec: TaskSpec, record: dict, where: str) -> Example:
    """An Example from a record {field: value}; missing or non-text fields raise."""
    texts = []
    for field in (spec.text_field, spec.pair_field):
        if field is None:
            texts.append(None)
            continue
        if field not in record:
            raise TaskDataError(f"{where}: missing field {field!r} (fields: "
                                f"{', '.join(map(str, record))})")
        value = record[field]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise TaskDataError(f"{where}: field {field!r} is not text: {value!r}")
        texts.append(value)
    if spec.label_field not in record:
        raise TaskDataError(f"{where}: missing field {spec.label_field!r} (fields: "
                            f"{', '.join(map(str, record))})")
    label = record[spec.label_field]
    if label is None or label == "":
        raise TaskDataError(f"{where}: field {spec.label_field!r} is empty")
    return Example(texts[0], texts[1], label_value(spec, label, where), where)


def file_format(path: Path, declared: str = "auto") -> str:
    """The format of a task file: `declared` unless "auto", else by suffix (see the module
    docstring). Raises TaskDataError for an unknown suffix or format."""
    if declared != "auto":
        if declared not in FILE_FORMATS:
            raise TaskDataError(f"{path}: unknown format {declared!r}; valid: "
                                f"{', '.join(FILE_FORMATS)}")
        return declared
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TaskDataError(f"{path}: cannot tell the format from the suffix {path.suffix!r} "
                            f"(known: {', '.join(_SUFFIXES)}); set the source's format")
    return kind


def iter_records(path: Path, fmt: str = "auto",
                 columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, {field: value}) of every record of a task file, in order. `columns` names the
    columns of a TSV/CSV file without a header. Raises TaskDataError for a missing file, a
    malformed line or a row whose number of fields differs from the header."""
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    fmt = file_format(path, fmt)
    if fmt in ("tsv", "csv"):
        yield from _delimited_records(path, fmt, columns)
    elif fmt == "jsonl":
        yield from _jsonl_records(path)
    else:
        yield from _parquet_records(path)


def _delimited_records(path: Path, fmt: str, columns: Sequence[str] | None):
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, **options)
        header = list(columns) if columns is not None else None
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if header is None:
                    header = row
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) < len(header):
                    raise TaskDataError(f"{where}: missing field {header[len(row)]!r} (the row "
                                        f"has {len(row)} fields, the header {len(header)})")
                if len(row) > len(header):
                    raise TaskDataError(f"{where}: {len(row)} fields, the header has "
                                        f"{len(header)} ({', '.join(header)})")
                yield where, dict(zip(header, row))
        except csv.Error as err:
            raise TaskDataError(f"{path}:{reader.line_num}: malformed {fmt.upper()}: "
                                f"{err}") from None


def _jsonl_records(path: Path):
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{where}: malformed JSON line: {err.msg}") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{where}: a {type(record).__name__}, not a JSON object")
            yield where, record


def _parquet_records(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise TaskDataError(f"{path}: not a Parquet file: {err}") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", record


def _file_examples(spec: TaskSpec, path: Path) -> Iterator[Example]:
    source = spec.source
    for where, record in iter_records(path, source.format, source.columns):
        yield _make(spec, record, where)


def infer_labels(path: str | Path, label_field: str, fmt: str = "auto",
                 columns: Sequence[str] | None = None) -> tuple[str, ...]:
    """The distinct values of `label_field` in a task file, as text, sorted (numerically when
    all are integers, so "2" < "10"). Raises TaskDataError for a missing field or no labels."""
    values = set()
    for where, record in iter_records(Path(path), fmt, columns):
        if label_field not in record:
            raise TaskDataError(f"{where}: missing field {label_field!r} (fields: "
                                f"{', '.join(map(str, record))})")
        value = record[label_field]
        if value is None or value == "":
            raise TaskDataError(f"{where}: field {label_field!r} is empty")
        values.add(str(int(value)) if isinstance(value, float) and value.is_integer()
                   else str(value))
    if not values:
        raise TaskDataError(f"{path}: no examples to infer the labels from")
    if all(_is_int(v) for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


# --- TFDS --------------------------------------------------------------------------------------


def open_tfds(name: str, split: str, data_dir: str | None) -> Sequence:
    """Random-access records of `split` of the prepared TFDS dataset `name` (e.g. "glue/mrpc")
    under `data_dir` (None: TFDS's default). Never downloads: raises TaskDataError saying how
    to prepare it when it is not prepared, or not in the array_record format that reading
    without TensorFlow needs, and naming the valid splits for an unknown one."""
    import tensorflow_datasets as tfds

    where = f"tfds {name} in {data_dir or 'the default data_dir'}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # TFDS raises many types; the message is what matters
        raise TaskDataError(f"{where}: {err}") from None
    if not builder.is_prepared():
        raise TaskDataError(
            f"{where}: not prepared (no {builder.data_dir}); prepare it where downloads work "
            f"with `tfds build {name} --data_dir DIR --file_format array_record` and pass that "
            f"DIR (ettin-jax never downloads)")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(file_format) != "array_record":
        raise TaskDataError(
            f"{where}: prepared as {file_format}, which needs TensorFlow to read; prepare it "
            f"with `tfds build {name} --data_dir DIR --file_format array_record`")
    if split not in builder.info.splits:
        raise TaskDataError(f"{where}: no split {split!r} (splits: "
                            f"{', '.join(sorted(builder.info.splits))})")
    try:
        return builder.as_data_source(split=split)
    except Exception as err:
        raise TaskDataError(f"{where} split {split!r}: {err}") from None


def _tfds_examples(spec: TaskSpec, split: str) -> Iterator[Example]:
    source = spec.source
    records = open_tfds(source.name, split, source.data_dir)
    info = getattr(records, "dataset_info", None)
    features = info.features if info is not None else {}
    names = getattr(features[spec.label_field], "names", None) \
        if spec.label_field in features else None
    if spec.labels is not None and names is not None and tuple(names) != spec.labels:
        raise TaskDataError(f"tfds {source.name}: feature {spec.label_field!r} has the labels "
                            f"{tuple(names)}, the task says {spec.labels}")
    for index in range(len(records)):
        where = f"tfds {source.name} {split} record {index}"
        record = records[index]
        if spec.labels is not None and record.get(spec.label_field) == -1:
            raise TaskDataError(f"{where}: field {spec.label_field!r} is -1 (unlabelled: GLUE's "
                                f"test splits have no labels)")
        yield _make(spec, {k: _plain(v) for k, v in record.items()}, where)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


# --- encoding ----------------------------------------------------------------------------------


def truncate_pair(first: int, second: int | None, budget: int) -> tuple[int, int | None]:
    """Lengths (first, second) that fit `budget` tokens together, as transformers' "longest_first"
    truncation leaves them (its slow tokenizers' `truncate_sequences`): one token at a time
    from the end of the longer sequence, from the second on a tie. A single text is cut to
    `budget`."""
    if second is None:
        return min(first, budget), None
    excess = first + second - budget
    if excess <= 0:
        return first, second
    if abs(first - second) >= excess:
        return (first - excess, second) if first > second else (first, second - excess)
    return (budget + 1) // 2, budget // 2


def encode_examples(examples: Sequence[Example], tokenizer, *, objective: str,
                    max_length: int) -> dict[str, np.ndarray]:
    """The model inputs of `examples`, in order:
    input_ids [n, max_length] int32: the member's template (`with_special_tokens`: encoder
      [CLS] A [SEP] (B [SEP]), decoder [CLS] A ([SEP] B)) right-padded with the pad id;
    attention_mask [n, max_length] int32: 1 on the tokens, 0 on padding;
    labels [n]: int32 class indices, or float32 regression targets.
    Texts too long are truncated at their end (pairs longest-first, `truncate_pair`) so the
    special tokens always survive. `tokenizer`: anything with `encode(str)` and
    `special_tokens`. Deterministic. Raises ValueError when max_length leaves no room for text
    or the labels mix classes and regression targets."""
    specials = tokenizer.special_tokens
    n = len(examples)
    input_ids = np.full((n, max_length), specials.pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    floats = [isinstance(e.label, float) for e in examples]
    if any(floats) and not all(floats):
        raise ValueError("labels mix class indices and regression targets")
    labels = np.asarray([e.label for e in examples],
                        np.float32 if floats and floats[0] else np.int32)
    overhead = {pair: len(with_special_tokens([], [] if pair else None, specials,
                                              objective=objective)) for pair in (False, True)}
    for row, example in enumerate(examples):
        has_pair = example.pair is not None
        budget = max_length - overhead[has_pair]
        if budget < 1 + has_pair:
            raise ValueError(f"max_length {max_length} leaves no room for text after the "
                             f"{overhead[has_pair]} special tokens")
        first = np.asarray(tokenizer.encode(example.text))
        second = np.asarray(tokenizer.encode(example.pair)) if has_pair else None
        keep_first, keep_second = truncate_pair(
            len(first), None if second is None else len(second), budget)
        ids = with_special_tokens(first[:keep_first],
                                  None if second is None else second[:keep_second],
                                  specials, objective=objective)
        input_ids[row, :ids.size] = ids
        attention_mask[row, :ids.size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_texts(texts: Sequence[str], tokenizer, *, objective: str,
                 max_length: int) -> dict[str, np.ndarray]:
    """input_ids and attention_mask [n, max_length] of single texts, as `encode_examples`
    encodes a text without a pair (the member's special tokens, truncated at the end, right
    padding)."""
    encoded = encode_examples([Example(text, None, 0, "") for text in texts], tokenizer,
                              objective=objective, max_length=max_length)
    return {key: encoded[key] for key in ("input_ids", "attention_mask")}
