"""Sources of documents: text files, JSON Lines, Parquet, TFDS, the bundled corpus, MDS
directories (`data_pipelines.mds`) and prepared (pre-tokenized) shards, as grain datasets of token
arrays.

Sources that are not prepared are read front to back by `iter_documents`, in `SourceUnit`s (a
file, a range of TFDS records or of MDS shards: what one worker of a distributed preparation
reads), as texts, or as token ids where a source stores them (an MDS or Parquet column of integer
arrays: Ettin's released data and training order; `token_ids`). It counts what it had to fix or
skip (`SourceStats`): invalid UTF-8 is replaced (and counted), empty documents are skipped (and
counted), documents longer than `MAX_DOCUMENT_CHARS` are cut at line boundaries into pieces (and
counted) so one enormous document cannot exhaust memory. Structural problems (a missing path, a
source without documents) raise `SourceError`; so do bad records (a malformed JSON line, a missing
or non-string field, a file that is not Parquet), naming the file and line, unless the reader asks
to skip them (`data prepare` does: at 2T tokens one bad line must not end the job), when they are
counted and the first is named. For corpora larger than memory, `ettin-jax data prepare` streams
them into shards.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from etils import epath

from data_pipelines.config import SourceConfig
from ettin_jax import storage

MAX_DOCUMENT_CHARS = 1_000_000
# Documents whose tokens measure an in-memory source's tokens per character (all of them when
# the source has no more).
LENGTH_SAMPLE_DOCUMENTS = 512
MANIFEST = "manifest.json"  # a finished `data prepare` directory
PREPARE_SETTINGS = "progress/settings.json"  # a started one
BUNDLED = "bundled"
TFDS_RECORDS_PER_UNIT = 65_536


class SourceError(ValueError):
    """A source cannot be read; the message names the source, file and line where known."""


class MissingInputError(SourceError):
    """A file or directory that a recipe or command names does not exist. `path` is it; the
    message names it and the command that creates it."""

    def __init__(self, message: str, path: str | Path):
        super().__init__(message)
        self.path = str(path)


PREPARE_COMMAND = "ettin-jax data prepare SOURCE... --tokenizer TOKENIZER_DIR --out {path}"
TOKENIZER_COMMAND = "ettin-jax tokenizer train [SOURCE...] --vocab-size N --out {path}"


def check_prepared(path: storage.PathLike, key: str) -> epath.Path:
    """`path` as the directory of a finished `ettin-jax data prepare`; `key` is the recipe key
    or option that names it (local or a URL). Raises MissingInputError saying how to prepare it
    when it does not exist, and SourceError saying how to resume when the preparation did not
    finish."""
    path = storage.path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / PREPARE_SETTINGS).is_file():
        raise SourceError(f"{key}: {path} is an unfinished preparation (no {MANIFEST}); rerun "
                          f"the `ettin-jax data prepare` command that started it to resume")
    if path.exists():
        raise SourceError(f"{key}: {path} is not prepared data (no {MANIFEST}); prepare it "
                          f"with `{PREPARE_COMMAND.format(path=path)}` into an empty directory")
    raise MissingInputError(f"{key}: prepared data {path} does not exist; prepare it with "
                            f"`{PREPARE_COMMAND.format(path=path)}`", path)


@dataclasses.dataclass
class SourceStats:
    """What reading a source fixed or skipped, by count."""

    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    enormous_split: int = 0
    bad_records_skipped: int = 0
    first_bad_record: str = ""  # "file:line: what is wrong" of the first one skipped

    def as_dict(self) -> dict[str, int | str]:
        """The counts by name (and the first bad record)."""
        return dataclasses.asdict(self)

    def add(self, other: SourceStats) -> None:
        """Adds the counts of `other` (read after this one) to these."""
        for field in dataclasses.fields(self):
            count = getattr(self, field.name)
            if isinstance(count, int):
                setattr(self, field.name, count + getattr(other, field.name))
        self.first_bad_record = self.first_bad_record or other.first_bad_record

    def skip_bad_record(self, where: str, problem: str, *, skip: bool) -> None:
        """Counts the bad record at `where` when `skip`; raises SourceError naming it if not."""
        if not skip:
            raise SourceError(f"{where}: {problem}")
        self.bad_records_skipped += 1
        self.first_bad_record = self.first_bad_record or f"{where}: {problem}"


def source_kind(source: SourceConfig) -> str:
    """The kind of `source`, inferring "auto" from the path (see `SourceConfig`)."""
    if source.kind != "auto":
        return source.kind
    if source.path == BUNDLED:
        return "bundled"
    path = storage.path(source.path)
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / PREPARE_SETTINGS).is_file()):
        return "prepared"
    if path.is_dir() and (path / "index.json").is_file():
        return "mds"  # mosaicml-streaming's format (data_pipelines.mds)
    return "text"  # per-file kinds (jsonl, parquet, text) are inferred by suffix when reading


def source_files(source: SourceConfig) -> list[epath.Path]:
    """The files a file-based source reads, sorted: a file, every file under a directory (not
    hidden ones), or what a glob matches; local or in object storage (gs://, s3://: what the
    workers of a distributed preparation can read). Raises SourceError when there are none."""
    path = source.path
    if any(ch in path for ch in "*?["):
        if storage.is_remote(path):  # the glob applies below the last fixed directory
            fixed = path[:min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            files = sorted(p for p in storage.path(fixed).glob(path[len(fixed) + 1:])
                           if p.is_file())
        else:
            files = [storage.path(p) for p in sorted(glob.glob(path, recursive=True))
                     if Path(p).is_file()]
        if not files:
            raise SourceError(f"source {path!r}: the pattern matches no files")
        return files
    root = storage.path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(directory / name for directory, _, names in root.walk() for name in names
                       if not any(part.startswith(".") for part in
                                  (directory / name).relative_to(root).parts))
        if not files:
            raise SourceError(f"source {path!r}: the directory holds no files")
        return files
    raise SourceError(f"source {path!r}: no such file or directory")


@dataclasses.dataclass(frozen=True)
class SourceUnit:
    """A piece of a text-like source that one reader reads front to back: a file of a
    file-based source, TFDS records [start, stop), MDS shards [start, stop), or the whole
    bundled corpus (all None)."""

    file: str | None = None
    start: int | None = None
    stop: int | None = None


def source_units(source: SourceConfig) -> list[SourceUnit]:
    """The units of a text-like source, in document order: its documents are those of the
    units in this order. Raises SourceError when it has none (see `source_files`)."""
    kind = source_kind(source)
    if kind == "prepared":
        raise SourceError(f"source {source.path!r} is prepared (token shards), not text")
    if kind == "bundled":
        return [SourceUnit()]
    if kind == "mds":
        from data_pipelines.mds import read_index

        return [SourceUnit(start=number, stop=number + 1)
                for number in range(len(read_index(source.path).shards))]
    if kind == "tfds":
        count = len(tfds_records(source))
        return [SourceUnit(start=start, stop=min(start + TFDS_RECORDS_PER_UNIT, count))
                for start in range(0, count, TFDS_RECORDS_PER_UNIT)]
    return [SourceUnit(file=str(file)) for file in source_files(source)]


def iter_documents(source: SourceConfig, stats: SourceStats, *, tokenizer=None,
                   units: Sequence[SourceUnit] | None = None,
                   skip_bad_records: bool = False) -> Iterator[str | np.ndarray]:
    """The documents of a source that is not "prepared", in a fixed order: those of `units`
    (default: all of `source_units`), in order. Strings, or int32 arrays where the source
    stores token ids (an MDS column of integer arrays, a Parquet column of integer lists: how
    Ettin released its data and its training order; see `token_ids`, which `tokenizer`
    parametrises).

    Updates `stats` as it goes. Raises SourceError for unreadable input, and for bad records
    unless `skip_bad_records` (then they are counted in `stats`).
    """
    kind = source_kind(source)
    for unit in source_units(source) if units is None else units:
        for document in _raw_documents(source, kind, unit, stats, skip_bad_records, tokenizer):
            if not isinstance(document, str):
                if len(document):
                    stats.documents += 1
                    yield document
                else:
                    stats.empty_skipped += 1
                continue
            if not document.strip():
                stats.empty_skipped += 1
                continue
            pieces = list(_split_enormous(document))
            if len(pieces) > 1:
                stats.enormous_split += 1
            stats.documents += len(pieces)
            yield from pieces


def iter_texts(source: SourceConfig, stats: SourceStats, *, units: Sequence[SourceUnit] | None
               = None, skip_bad_records: bool = False) -> Iterator[str]:
    """`iter_documents` of a source of text. Raises SourceError for a source of token ids."""
    for document in iter_documents(source, stats, units=units,
                                   skip_bad_records=skip_bad_records):
        if not isinstance(document, str):
            raise SourceError(f"source {source.path!r}: field {source.field!r} holds token "
                              f"ids, not text")
        yield document


def token_ids(value: np.ndarray, where: str, tokenizer=None) -> np.ndarray:
    """A stored document's token ids as a new int32 array, as Ettin stored its chunks: one
    leading [CLS] and one trailing [SEP] of `tokenizer` are removed when present (the packer
    brackets every chunk itself). Raises SourceError naming `where` for anything but a flat
    array of integers, or an id outside `tokenizer`'s vocabulary (without a tokenizer: int32)."""
    value = np.asarray(value)
    if value.ndim != 1 or (len(value) and value.dtype.kind not in "iu"):
        raise SourceError(f"{where}: a {value.dtype} array of shape {value.shape}, not a flat "
                          f"array of token ids")
    if tokenizer is not None and len(value) and value[0] == tokenizer.special_tokens.cls:
        value = value[1:]
    if tokenizer is not None and len(value) and value[-1] == tokenizer.special_tokens.sep:
        value = value[:-1]
    if len(value):
        high = tokenizer.vocab_size if tokenizer is not None else np.iinfo(np.int32).max + 1
        low, top = int(value.min()), int(value.max())
        if low < 0 or top >= high:
            raise SourceError(f"{where}: token id {low if low < 0 else top} is outside "
                              f"{'the vocabulary' if tokenizer is not None else 'int32'} "
                              f"[0, {high}); the data was tokenized with another tokenizer")
    return np.array(value, np.int32)


def _raw_documents(source: SourceConfig, kind: str, unit: SourceUnit, stats: SourceStats,
                   skip: bool, tokenizer) -> Iterator[str | np.ndarray]:
    if kind == "bundled":
        from data_pipelines.corpus import bundled_documents

        try:
            documents = bundled_documents(source.split)  # type: ignore[arg-type]
        except ValueError as err:
            raise SourceError(f"source 'bundled': {err}") from None
        yield from (d.text for d in documents)
    elif kind == "tfds":
        yield from _tfds_texts(source, unit, stats)
    elif kind == "mds":
        from data_pipelines.mds import iter_mds_documents

        yield from iter_mds_documents(source, tokenizer, shards=None if unit.stop is None
                                      else range(unit.start or 0, unit.stop))
    else:
        file = storage.path(unit.file)
        file_kind = _kind_of(file) if source.kind == "auto" else kind
        if file_kind == "jsonl":
            yield from _jsonl_texts(file, source.field, stats, skip)
        elif file_kind == "parquet":
            yield from _parquet_documents(file, source.field, stats, skip, tokenizer)
        else:
            text = _decode(file.read_bytes(), stats)
            if source.documents == "blank_lines":
                yield from _blank_line_documents(text)
            else:
                yield text


def _kind_of(file: epath.Path) -> str:
    suffix = file.suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _decode(raw: bytes, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _blank_line_documents(text: str) -> Iterator[str]:
    document: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            document.append(line)
        elif document:
            yield "".join(document)
            document = []
    if document:
        yield "".join(document)


def _jsonl_texts(file: epath.Path, field: str, stats: SourceStats,
                 skip: bool) -> Iterator[str]:
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, stats))
            except json.JSONDecodeError as err:
                stats.skip_bad_record(f"{file}:{number}", f"malformed JSON line: {err.msg}",
                                      skip=skip)
                continue
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                stats.skip_bad_record(f"{file}:{number}", f"no field {field!r} (found {keys}); "
                                      f"set the source's `field`", skip=skip)
                continue
            value = record[field]
            if value is not None and not isinstance(value, str):
                stats.skip_bad_record(f"{file}:{number}", f"field {field!r} is not a string",
                                      skip=skip)
                continue
            yield value or ""


def _parquet_documents(file: epath.Path, field: str, stats: SourceStats, skip: bool,
                       tokenizer) -> Iterator[str | np.ndarray]:
    """A Parquet file's `field`: strings, or token arrays for a column of integer lists."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file.open("rb") if storage.is_remote(file) else file)
    except Exception as err:  # pyarrow raises several types for a bad file
        stats.skip_bad_record(str(file), f"not a Parquet file: {err}", skip=skip)
        return
    if field not in parquet.schema_arrow.names:
        raise SourceError(f"{file}: no column {field!r} (columns: {parquet.schema_arrow.names}); "
                          f"set the source's `field`")
    kind = parquet.schema_arrow.field(field).type
    is_tokens = ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                 and pa.types.is_integer(kind.value_type))
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        column = batch.column(0)
        if not is_tokens:
            yield from (value or "" for value in column.to_pylist())
            continue
        ends = np.cumsum(pc.fill_null(pc.list_value_length(column), 0).to_numpy())
        ids = column.flatten().to_numpy(zero_copy_only=False)
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            yield token_ids(ids[start:end], f"{file} row {row}", tokenizer)
            row += 1


def _tfds_texts(source: SourceConfig, unit: SourceUnit, stats: SourceStats) -> Iterator[str]:
    records = tfds_records(source)
    for index in range(unit.start or 0, len(records) if unit.stop is None else unit.stop):
        record = records[index]
        value = record.get(source.field) if isinstance(record, dict) else None
        if value is None:
            raise SourceError(f"tfds {source.path!r}: no feature {source.field!r} "
                              f"(features: {sorted(record) if isinstance(record, dict) else '?'})")
        yield _decode(value, stats) if isinstance(value, bytes) else str(value)


def tfds_records(source: SourceConfig) -> Sequence:
    """Random-access records of a TFDS dataset built in the array_record format (no TensorFlow
    needed: `tfds.data_source`). Raises SourceError when it cannot be opened."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(source.path, split=source.split, data_dir=source.data_dir)
    except Exception as err:  # TFDS raises many types; the message is what matters
        raise SourceError(f"tfds {source.path!r} split {source.split!r}: {err}") from None


def _split_enormous(text: str) -> Iterator[str]:
    """`text` in pieces of at most MAX_DOCUMENT_CHARS, cut after a newline where there is one."""
    start = 0
    while len(text) - start > MAX_DOCUMENT_CHARS:
        end = text.rfind("\n", start, start + MAX_DOCUMENT_CHARS) + 1
        if end <= start:
            end = start + MAX_DOCUMENT_CHARS
        yield text[start:end]
        start = end
    yield text[start:]


# --- as grain datasets of token arrays ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenDocuments:
    """A source as a random-access grain dataset of int32 token arrays (no special tokens).

    mean_tokens() -> the mean document length in tokens (what turns a mixture's token shares
    into document sampling weights): prepared sources: the manifest's tokens / documents
    (exact); in-memory sources: the exact mean character count of the documents times the
    tokens per character of up to LENGTH_SAMPLE_DOCUMENTS evenly spaced documents (exact when
    the source holds no more, and for token ids). Computed on first use only.
    """

    source: SourceConfig
    dataset: grain.MapDataset
    stats: SourceStats
    mean_tokens: Callable[[], float] = dataclasses.field(default=lambda: 1.0, repr=False,
                                                         compare=False)


def open_source(source: SourceConfig, tokenizer) -> TokenDocuments:
    """`source` as token arrays: prepared shards and MDS directories are read where they lie
    (an MDS token column keeps its ids, see `data_pipelines.mds`); other sources are read
    into memory (`iter_documents`), texts tokenized on access with `tokenizer` (anything with
    `encode(str)`), stored token ids kept.

    Raises SourceError when the source holds no documents.
    """
    stats = SourceStats()
    if source_kind(source) == "prepared":
        from data_pipelines.prepare import open_prepared

        dataset, stats.documents = open_prepared(source.path, tokenizer)
        mean_tokens = functools.cache(functools.partial(_prepared_mean_tokens, source.path))
    elif source_kind(source) == "mds":  # read where it lies, token ids as they are
        from data_pipelines.mds import open_mds

        dataset, stats.documents, mean_tokens = open_mds(source, tokenizer)
    else:
        documents = list(iter_documents(source, stats, tokenizer=tokenizer))
        tokens_of = functools.partial(_tokens_of, tokenizer)
        dataset = grain.MapDataset.source(documents).map(tokens_of)
        mean_tokens = functools.cache(functools.partial(_memory_mean_tokens, documents,
                                                        tokens_of))
    if stats.documents == 0:
        raise SourceError(f"source {source.path!r} holds no documents "
                          f"({stats.empty_skipped} empty ones skipped)")
    return TokenDocuments(source, dataset, stats, mean_tokens)


def _prepared_mean_tokens(path: str) -> float:
    manifest = json.loads((storage.path(path) / MANIFEST).read_text())
    return manifest["tokens"] / max(manifest["documents"], 1)


def _tokens_of(tokenizer, document: str | np.ndarray) -> np.ndarray:
    return tokenizer.encode(document) if isinstance(document, str) else document


def _memory_mean_tokens(documents: Sequence[str | np.ndarray], tokens_of: Callable) -> float:
    count = len(documents)
    sampled = min(count, LENGTH_SAMPLE_DOCUMENTS)
    picked = sorted({(i * count) // sampled for i in range(sampled)})
    sample_chars = sum(len(documents[i]) for i in picked)  # token arrays: their tokens
    sample_tokens = sum(len(tokens_of(documents[i])) for i in picked)
    if len(picked) == count or sample_chars == 0:
        return sample_tokens / max(len(picked), 1)
    return sum(len(d) for d in documents) / count * sample_tokens / sample_chars


def document_weights(sources: Sequence[TokenDocuments]) -> list[float]:
    """Per-source document sampling weights that give each source its `weight` as a share of
    TOKENS (Ettin's proportions are shares of tokens): weight / mean document length in
    tokens, normalised to sum to 1. One source: [1.0]."""
    if len(sources) == 1:
        return [1.0]
    raw = [s.source.weight / max(s.mean_tokens(), 1.0) for s in sources]
    return [w / sum(raw) for w in raw]


def mixture(sources: Sequence[TokenDocuments], *, seed: int) -> grain.MapDataset:
    """An endless stream of documents from `sources` as records {"tokens": int32 array,
    "source": index in `sources`}, mixed so that each source's `weight` is its share of the
    tokens (`document_weights`); each source is reshuffled every epoch, deterministically for
    `seed`, unless it says `shuffle: false` (then its documents come in its order, every
    epoch: a published order replayed). (grain rounds the mixing proportions to integers,
    the smallest to 100: a share is off by at most 1% of itself.)"""
    endless = []
    for index, s in enumerate(sources):
        records = s.dataset.map(functools.partial(_record, index))
        if s.source.shuffle:
            records = records.shuffle(seed=_source_seed(seed, index))
        endless.append(records.repeat(None))
    if len(endless) == 1:
        return endless[0]
    return grain.MapDataset.mix(endless, weights=document_weights(sources))


def _record(source: int, tokens) -> dict:
    return {"tokens": np.asarray(tokens, np.int32), "source": source}


def _source_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
