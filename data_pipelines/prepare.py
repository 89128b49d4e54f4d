"""`ettin-jax data prepare`: sources -> tokenized ArrayRecord shards, resumable, on every core of
this machine (the local runner) or as an Apache Beam pipeline (`data_pipelines.beam_prepare`).

    OUT/
      manifest.json            written last: documents, tokens, shards, sources, skip counts
      tokenizer/               the tokenizer the shards were made with
      shard-00000.array_record one record per document: int32 token ids, no special tokens
      progress/                settings.json and one JSON file per finished shard (for resume)

Shard i holds documents [i * documents_per_shard, (i + 1) * documents_per_shard) of the sources
read in order, whichever runner made it: both give the same bytes. The local runner reads the
documents in the main process and hands them, a shard at a time, to worker processes that
tokenize and write their shard (to a temporary file that replaces the final one when complete;
OUT may be a gs:// or s3:// URL, then each shard is one upload and manifest.json the last).
A rerun of the same command after an interruption skips the finished shards; different
settings in the same OUT are refused. Bad records (a malformed JSON line, ...) are skipped,
counted per source in the manifest and the first one named.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Literal

import grain
import numpy as np
from etils.epath import Path
from tqdm import tqdm

from data_pipelines.config import SourceConfig
from data_pipelines.sources import (
    MANIFEST,
    PREPARE_SETTINGS,
    SourceError,
    SourceStats,
    check_prepared,
    iter_documents,
)
from ettin_jax import storage

FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
PROGRESS_DIR = os.path.dirname(PREPARE_SETTINGS)
# Tokenizer fingerprint: ids of this text must match between prepare and training.
PROBE_TEXT = "Ettin: def pair(encoder, decoder):\n    return 'the same network' # über 50% ✓"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must agree between the tokenizer of the shards and the one training uses."""
    return {"vocab_size": int(tokenizer.vocab_size),
            "special_tokens": tokenizer.special_tokens.as_dict(),
            "probe_ids": [int(i) for i in tokenizer.encode(PROBE_TEXT)]}


def prepare(
    sources: Sequence[SourceConfig],
    tokenizer,
    out: storage.PathLike,
    *,
    documents_per_shard: int = 4096,
    workers: int | None = None,
    progress: bool = True,
    runner: Literal["local", "beam"] = "local",
    beam_options: Sequence[str] = (),
) -> dict:
    """Tokenizes `sources` into shards under `out`; returns the manifest (also written).

    workers: processes (default: every core; the Beam DirectRunner's workers too). runner:
    "local" (processes on this machine) or "beam" (`data_pipelines.beam_prepare`; beam_options
    are Beam pipeline options such as --runner=DataflowRunner). The same sources, tokenizer
    and documents_per_shard give byte-identical shards and manifest, whatever `workers` and
    `runner`. Raises SourceError for unreadable sources and when `out` holds a preparation
    with other settings or other files.
    """
    out = storage.path(out)
    settings = {
        "format_version": FORMAT_VERSION,
        "sources": [_source_dict(s) for s in sources],
        "documents_per_shard": documents_per_shard,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("settings") == settings:
            return manifest
        raise SourceError(f"{out} already holds prepared data made with other settings; "
                          f"choose another output directory")
    _start_or_resume(out, settings, tokenizer)
    workers = workers or os.cpu_count() or 1
    if runner == "beam":
        from data_pipelines.beam_prepare import prepare_with_beam

        stats = prepare_with_beam(sources, out, documents_per_shard=documents_per_shard,
                                  workers=workers, beam_options=beam_options)
    elif runner == "local":
        stats = _prepare_locally(sources, tokenizer, out, documents_per_shard=documents_per_shard,
                                 workers=workers, progress=progress)
    else:
        raise ValueError(f"runner must be 'local' or 'beam', got {runner!r}")
    return _write_manifest(out, settings, stats)


def _prepare_locally(sources: Sequence[SourceConfig], tokenizer, out: Path, *,
                     documents_per_shard: int, workers: int,
                     progress: bool) -> dict[str, SourceStats]:
    stats = {s.path: SourceStats() for s in sources}
    documents = itertools.chain.from_iterable(
        iter_documents(s, stats[s.path], tokenizer=tokenizer, skip_bad_records=True)
        for s in sources)
    shards = _batched(documents, documents_per_shard)
    bar = tqdm(desc=f"prepare {out.name}", unit=" docs", disable=not progress)
    pending: list[Future] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for index, documents in enumerate(shards):
            if finished_shard(out, index):
                bar.update(len(documents))
                continue
            pending.append(pool.submit(write_shard, out, index, documents, tokenizer))
            while len([f for f in pending if not f.done()]) >= 2 * workers:
                _collect(pending, bar, wait_for_one=True)
            _collect(pending, bar)
        while pending:
            _collect(pending, bar, wait_for_one=True)
    bar.close()
    return stats


def _source_dict(source: SourceConfig) -> dict:
    """The source as the settings of a preparation record it. Without `shuffle`: the order
    training reads a source in is not the preparation's (and earlier preparations, recorded
    before the field existed, stay resumable)."""
    from dataclasses import asdict

    return {key: value for key, value in asdict(source).items() if key != "shuffle"}


def _start_or_resume(out: Path, settings: dict, tokenizer) -> None:
    settings_file = out / PREPARE_SETTINGS
    if settings_file.is_file():
        if json.loads(settings_file.read_text()) != settings:
            raise SourceError(f"{out} holds an interrupted preparation with other settings; "
                              f"rerun it with the same sources and tokenizer, or choose another "
                              f"output directory")
        return
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out} is not empty and holds no preparation; choose another "
                          f"output directory")
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_DIR)
    storage.write_text_atomically(settings_file, json.dumps(settings, indent=1))


def _batched(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, size)):
        yield batch


def finished_shard(out: Path, index: int) -> bool:
    """Whether shard `index` of the preparation in `out` was written completely."""
    return (out / PROGRESS_DIR / f"{index:05d}.json").is_file() and (out / shard_name(index)).is_file()


def _collect(pending: list[Future], bar, *, wait_for_one: bool = False) -> None:
    if wait_for_one and pending:
        pending[0].result()
    for future in [f for f in pending if f.done()]:
        bar.update(future.result())
        pending.remove(future)


def write_shard(out: Path, index: int, documents: list[str | np.ndarray], tokenizer) -> int:
    """Tokenizes `documents` (texts; token arrays are kept as they are) into shard `index` of
    `out` and records it as finished (each file replaced in one step: a retry rewrites the same
    bytes); returns the number of documents."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = out / shard_name(index)
    texts = [d for d in documents if isinstance(d, str)]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    token_ids = [np.asarray(next(encoded) if isinstance(d, str) else d, np.int32)
                 for d in documents]

    def write(tmp: str) -> None:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        try:
            for ids in token_ids:
                writer.write(ids.tobytes())
        finally:
            writer.close()

    storage.write_atomically(final, write)
    record = {"file": final.name, "documents": len(documents),
              "tokens": sum(len(ids) for ids in token_ids),
              "text_bytes": sum(len(t.encode("utf-8", errors="replace")) for t in texts)}
    storage.write_text_atomically(out / PROGRESS_DIR / f"{index:05d}.json", json.dumps(record))
    return len(documents)


def _write_manifest(out: Path, settings: dict, stats: dict[str, SourceStats]) -> dict:
    shards = [json.loads(p.read_text()) for p in sorted((out / PROGRESS_DIR).glob("[0-9]*.json"))]
    manifest = {
        "settings": settings,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "text_bytes": sum(s["text_bytes"] for s in shards),
        "shards": shards,
        "source_stats": {path: s.as_dict() for path, s in stats.items()},
    }
    if manifest["documents"] == 0:
        bad = [s.first_bad_record for s in stats.values() if s.first_bad_record]
        raise SourceError(f"no documents to prepare in {[s['path'] for s in settings['sources']]}"
                          + (f"; every record was bad, the first: {bad[0]}" if bad else ""))
    storage.write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def open_prepared(path: storage.PathLike, tokenizer) -> tuple[grain.MapDataset, int]:
    """The documents of prepared directory `path` as int32 token arrays, and their count.

    Shards in object storage are read from local copies (`storage.cached_copy`, downloaded
    once per shard and version, each on the first read of one of its documents:
    `_ShardsInStorage`): ArrayRecord's reader opens local files only, and the shuffled order
    reads single records all over every shard, one request each if streamed.

    Raises SourceError when `path` is not a finished preparation or was made with another
    tokenizer than `tokenizer` (None skips that check).
    """
    path = check_prepared(path, "source")
    manifest = json.loads((path / MANIFEST).read_text())
    if tokenizer is not None and manifest["settings"]["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise SourceError(f"{path}: prepared with another tokenizer than data.tokenizer "
                          f"(vocab {manifest['settings']['tokenizer']['vocab_size']} vs "
                          f"{tokenizer.vocab_size}); use {path / TOKENIZER_DIR} or prepare again")
    if storage.is_remote(path):
        source = _ShardsInStorage(path, manifest["shards"])
    else:
        source = grain.sources.ArrayRecordDataSource(
            [str(path / shard["file"]) for shard in manifest["shards"]])
    return grain.MapDataset.source(source).map(_decode_record), manifest["documents"]


class _ShardsInStorage:
    """The records of a preparation in object storage as one random-access source (grain's
    interface: len and getitem), each shard downloaded to the local cache when a record of it
    is first read, so a host fetches only the shards its rows touch, when they touch them."""

    def __init__(self, path, shards: list[dict]):
        self._path = str(path)
        self._files = [shard["file"] for shard in shards]
        self._starts = np.cumsum([0] + [shard["documents"] for shard in shards])
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> bytes:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        reader = self._readers.get(shard)
        if reader is None:
            local = storage.cached_copy(storage.path(self._path) / self._files[shard])
            reader = self._readers[shard] = grain.sources.ArrayRecordDataSource([str(local)])
        return reader[index - int(self._starts[shard])]

    def __getstate__(self) -> dict:  # readers stay with their process
        return {**self.__dict__, "_readers": {}}


def _decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=np.int32)
