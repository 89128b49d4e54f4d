"""`ettin-jax data prepare --runner beam`: the preparation of `data_pipelines.prepare` as an Apache
Beam pipeline, so that Dataflow, Flink or Spark spread a 2T-token corpus over many machines (the
DirectRunner runs it on this one).

It writes what the local runner writes, byte for byte: shard i holds documents
[i * documents_per_shard, (i + 1) * documents_per_shard) of the sources read in order. A document's
place in that order is only known once the documents before it are counted, so the pipeline
reads its input twice, both times spread over `SourceUnit`s (files, TFDS record ranges):

1. count: each unit's documents (and what was fixed or skipped: `SourceStats`), recorded under
   OUT/progress/units/ so that a rerun does not count again;
2. place: each unit's documents, numbered from the count of the units before it, keyed by shard
   (documents of finished shards are dropped here: a rerun resumes);
3. group by shard, tokenize in order and write the shard (`prepare.write_shard`: one atomic
   replace per file, so a retried bundle rewrites the same bytes).

array_record's own Beam sink is not used: it assigns records to shards as bundles arrive (not
deterministically) and writes to local disks only.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
from etils.epath import Path

from data_pipelines.config import SourceConfig
from data_pipelines.tokenizers import load_tokenizer
from data_pipelines.prepare import (
    PROGRESS_DIR,
    TOKENIZER_DIR,
    finished_shard,
    tokenizer_fingerprint,
    write_shard,
)
from data_pipelines.sources import (
    PREPARE_SETTINGS,
    SourceError,
    SourceStats,
    SourceUnit,
    iter_documents,
    source_units,
)
from ettin_jax import storage
from ettin_jax.errors import ConfigError

UNITS_DIR = f"{PROGRESS_DIR}/units"
METRICS_NAMESPACE = "ettin-jax data prepare"


def prepare_with_beam(sources: Sequence[SourceConfig], out: Path, *,
                      documents_per_shard: int, workers: int,
                      beam_options: Sequence[str] = ()) -> dict[str, SourceStats]:
    """Runs the preparation of `sources` into the started preparation `out` (its settings and
    tokenizer written: the workers load that tokenizer) as a Beam pipeline and waits for it;
    returns what reading each source fixed or skipped, by source path. The manifest is left to
    the caller.

    beam_options: Beam pipeline options (e.g. --runner=DataflowRunner --project=...); without a
    --runner, the DirectRunner runs `workers` worker processes here.
    """
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ConfigError("--runner beam needs Apache Beam: pip install 'ettin-jax[beam]'"
                          ) from None

    units = [(source_index, unit) for source_index, source in enumerate(sources)
             for unit in source_units(source)]
    numbered = list(enumerate(units))
    (out / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    finished = frozenset(index for index in range(_shards_so_far(out))
                         if finished_shard(out, index))
    options = PipelineOptions([
        "--runner=DirectRunner", f"--direct_num_workers={workers}",
        "--direct_running_mode=multi_processing", "--default_sdk_harness_log_level=WARNING",
        *beam_options])
    # The DirectRunner relays every worker log line, a failure's Beam traceback included, to
    # this logger; the failure itself is raised below, with the worker's message.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
        logging.CRITICAL)
    try:
        with beam.Pipeline(options=options) as pipeline:
            _build(pipeline, numbered, sources, str(out), documents_per_shard, finished)
    except Exception as err:  # a worker's SourceError reaches here as the runner's own type
        found = re.search(r"SourceError: (.+?)(?: \[while running '[^']*'\])?$", str(err),
                          re.MULTILINE)
        if found:
            raise SourceError(found.group(1)) from None
        raise
    return _stats_by_source(out, sources, units)


def _build(pipeline, numbered: list, sources: Sequence[SourceConfig], out: str,
           documents_per_shard: int, finished: frozenset[int]) -> None:
    """Adds the three steps of the module docstring to `pipeline`."""
    import apache_beam as beam

    sources = list(sources)
    spread = pipeline | "units" >> beam.Create(numbered) | "spread units" >> beam.Reshuffle()
    first_documents = (spread
                       | "count documents" >> beam.Map(_count_unit, sources, out)
                       | "all counts" >> beam.combiners.ToDict()
                       | "first document of each unit" >> beam.Map(_first_documents))
    _ = (spread
         | "documents by shard" >> beam.FlatMap(_documents_by_shard, sources, documents_per_shard,
                                                finished, out,
                                                beam.pvalue.AsSingleton(first_documents))
         | "gather shards" >> beam.GroupByKey()
         | "tokenize and write" >> beam.Map(_write_gathered_shard, out))


def _shards_so_far(out: Path) -> int:
    """One past the highest shard index with a progress record (0 for a fresh preparation)."""
    indexes = [int(p.stem) for p in (out / PROGRESS_DIR).glob("[0-9]*.json")]
    return max(indexes, default=-1) + 1


def _unit_record(out: str, unit_index: int) -> Path:
    return storage.path(out) / UNITS_DIR / f"{unit_index:07d}.json"


def _count_unit(element: tuple[int, tuple[int, SourceUnit]], sources: list[SourceConfig],
                out: str) -> tuple[int, int]:
    """Beam: (unit index, its number of documents), read once and recorded."""
    from apache_beam.metrics import Metrics

    unit_index, (source_index, unit) = element
    record = _unit_record(out, unit_index)
    if record.is_file():
        return unit_index, json.loads(record.read_text())["stats"]["documents"]
    stats = SourceStats()
    for _ in _documents(sources[source_index], stats, unit, out):
        pass
    storage.write_text_atomically(record, json.dumps({"unit": _unit_dict(unit),
                                                      "stats": stats.as_dict()}))
    Metrics.counter(METRICS_NAMESPACE, "documents").inc(stats.documents)
    Metrics.counter(METRICS_NAMESPACE, "bad_records_skipped").inc(stats.bad_records_skipped)
    return unit_index, stats.documents


def _documents(source: SourceConfig, stats: SourceStats, unit: SourceUnit,
               out: str) -> Iterator[str | np.ndarray]:
    """The documents of one unit as the local runner reads them (`prepare._prepare_locally`)."""
    return iter_documents(source, stats, tokenizer=_tokenizer(out), units=[unit],
                          skip_bad_records=True)


@functools.lru_cache(maxsize=4)
def _tokenizer(out: str):
    """The tokenizer the preparation in `out` saved (read once per worker process, rather than
    pickled into every step of the job: a tokenizer.json is megabytes, and Dataflow limits the
    size of a job's graph)."""
    tokenizer = load_tokenizer(storage.path(out) / TOKENIZER_DIR)
    settings = json.loads((storage.path(out) / PREPARE_SETTINGS).read_text())
    if tokenizer_fingerprint(tokenizer) != settings["tokenizer"]:
        raise SourceError(f"{out}/{TOKENIZER_DIR} is not the tokenizer this preparation was "
                          f"started with; prepare into a new directory")
    return tokenizer


def _unit_dict(unit: SourceUnit) -> dict:
    return {"file": unit.file, "start": unit.start, "stop": unit.stop}


def _first_documents(counts: dict[int, int]) -> dict[int, int]:
    """Beam: {unit index: the index of its first document among all sources' documents}."""
    first, total = {}, 0
    for unit_index in sorted(counts):
        first[unit_index] = total
        total += counts[unit_index]
    return first


def _documents_by_shard(element: tuple[int, tuple[int, SourceUnit]],
                        sources: list[SourceConfig], documents_per_shard: int,
                        finished: frozenset[int], out: str, first_documents: dict[int, int]
                        ) -> Iterator[tuple[int, tuple[int, str | np.ndarray]]]:
    """Beam: (shard index, (document index, document)) for the documents of one unit (texts,
    or token arrays: `iter_documents`), except those of finished shards."""
    unit_index, (source_index, unit) = element
    index = first_documents[unit_index]
    for document in _documents(sources[source_index], SourceStats(), unit, out):
        shard = index // documents_per_shard
        if shard not in finished:
            yield shard, (index, document)
        index += 1


def _write_gathered_shard(gathered: tuple[int, Sequence[tuple[int, str | np.ndarray]]],
                          out: str) -> int:
    """Beam: writes one shard from its (document index, document) pairs, in document order."""
    shard, documents = gathered
    in_order = sorted(documents, key=lambda pair: pair[0])
    return write_shard(storage.path(out), shard, [document for _, document in in_order],
                       _tokenizer(out))


def _stats_by_source(out: Path, sources: Sequence[SourceConfig],
                     units: Sequence[tuple[int, SourceUnit]]) -> dict[str, SourceStats]:
    """The counts recorded under OUT/progress/units, summed per source in unit order."""
    stats = {s.path: SourceStats() for s in sources}
    for unit_index, (source_index, _) in enumerate(units):
        recorded = json.loads(_unit_record(str(out), unit_index).read_text())["stats"]
        stats[sources[source_index].path].add(SourceStats(**recorded))
    return stats
