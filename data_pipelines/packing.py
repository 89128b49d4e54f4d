"""Documents -> fixed-length rows: chunks of documents, packed first-fit.

Documents are token arrays without special tokens. Each is split into chunks that fit a row
(content size C = seq_len - 2), every chunk becomes one segment of a row, and grain's first-fit
packer fills rows with them. Every row carries `segment_ids` (1..n per chunk, 0 = padding) and
`positions` (0 at each chunk's [CLS]). Two chunkings (`DataConfig.chunking`):

"bracketed" (the default): chunks of C tokens, each bracketed [CLS] ... [SEP]. Nothing is lost or
duplicated: every token of every document lands in exactly one row. The decoder learns to
predict [SEP] at every chunk's end.

"ettin": as Ettin's data (`pretraining/data_processing/src/sampling/
split_dataset_into_chunks_individual.py`, run with --add_eos_token --backfill
--backfill_no_duplicates -m 512 -a 32) and Ettin's loader (bert24 `src/text_data.py`):
  1. [SEP] (EOS) is appended to the document, at its true end only; the result is split into
     pieces of C tokens (the last one shorter).
  2. A piece shorter than `skip` tokens is dropped unless it is the document's first; its tokens
     are counted (`ChunkStats.skipped_tokens`), never silently lost. A dropped last piece takes
     the document's [SEP] with it (Ettin's data has such documents).
  3. A piece (necessarily the last) shorter than `min_chunk` tokens is back-filled: a random
     number r in [0, C - len) of tokens moves from the end of the previous piece to its front
     (no token duplicated). r is drawn from (data seed, a hash of the document's tokens), so
     the same command gives the same bytes, and a document chunks the same in every epoch,
     on every process, at every batch size (Ettin chunked once, offline).
  4. Each piece becomes a segment [CLS] piece, and, when the piece is not the document's end,
     a forced [SEP]: Ettin's loader forces that final [SEP] for encoders only; decoders saw
     [CLS] piece. Here both members pack the SAME segments (the encoder's form), so that the
     pair keeps seeing the same rows, and a per-token feature `forced_sep` (1 at a forced
     [SEP]) travels through the packer: `objectives.clm_labels` ignores the target of a forced
     [SEP], so for the causal decoder the forced [SEP] is inert (it is the segment's last
     token: nothing attends to it, it predicts nothing, and nothing predicts it). The decoder
     learns [SEP] only at a document's true end; it still counts as a real (non-padding) token
     in the decoder's token count, one per non-final chunk.
  The sizes: Ettin's -m 512 -a 32 were chosen for 1024-token rows (and kept for 8192-token
  rows); for shorter rows they shrink in proportion: min_chunk = min(min_chunk_tokens,
  seq_len // 2), skip = min(skip_chunk_tokens, seq_len // 32), so a tiny test row does not drop
  or back-fill nearly every tail.
  Deliberate difference: Ettin also re-encoded every chunk whose text does not start with a
  space (decode, then encode with a prefix space), which needs the text and the tokenizer; here
  chunks are token slices, never re-encoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from data_pipelines.special_tokens import SpecialTokens

# Chunks one document may yield; longer documents are already cut by the sources
# (MAX_DOCUMENT_CHARS), so this bounds the buffer, not the data.
_MAX_CHUNKS_PER_DOCUMENT = 1 << 16
CHUNKINGS = ("bracketed", "ettin")
FORCED_SEP = "forced_sep"  # the packed feature: 1 at a [SEP] that is not a document's end


@dataclasses.dataclass
class ChunkStats:
    """What chunking did to the documents of one source, by count.

    documents and tokens: documents read and their tokens (no special tokens); chunks: segments
    made; skipped_chunks / skipped_tokens: pieces dropped as too short ("ettin" chunking; their
    tokens include a dropped [SEP]); backfilled_chunks / backfilled_tokens: last pieces
    back-filled and the tokens moved into them.
    """

    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    skipped_chunks: int = 0
    skipped_tokens: int = 0
    backfilled_chunks: int = 0
    backfilled_tokens: int = 0

    def add(self, other: ChunkStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return dataclasses.asdict(self)


def chunk_sizes(seq_len: int, min_chunk_tokens: int = 512,
                skip_chunk_tokens: int = 32) -> tuple[int, int, int]:
    """(content C, min_chunk, skip) of "ettin" chunking for rows of `seq_len` tokens; see the
    module docstring."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 to hold [CLS] token [SEP], got {seq_len}")
    return (seq_len - 2, max(1, min(min_chunk_tokens, seq_len // 2)),
            min(skip_chunk_tokens, seq_len // 32))


def document_seed(seed: int, tokens: np.ndarray) -> list[int]:
    """Entropy for a document's random draws: the data seed and a hash of its tokens."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, np.int32).tobytes(), digest_size=8)
    return [int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest.digest(), "little")]


def backfill_draw(seed: int, tokens: np.ndarray, high: int) -> int:
    """The number of tokens a back-fill moves into `tokens`' last piece: uniform in [0, high)
    (Ettin: np.random.randint(0, C - len)), from (seed, the document's tokens) alone."""
    return int(np.random.default_rng(document_seed(seed, tokens)).integers(0, high))


@dataclasses.dataclass(frozen=True)
class EttinSplit:
    """Where "ettin" chunking cuts a document of n tokens (positions in the document followed by
    its [SEP], i.e. 0..n, with n the [SEP]): `spans` [(start, stop)] of the kept pieces in order,
    contiguous; everything from the last stop to n is dropped (`skipped` tokens, when the last
    piece was too short). `backfilled` tokens moved into the last piece."""

    spans: tuple[tuple[int, int], ...]
    skipped: int
    backfilled: int

    def ends_document(self, index: int, length: int) -> bool:
        """Whether piece `index` ends with the [SEP] of a document of `length` tokens."""
        return self.spans[index][1] == length + 1


def ettin_split(length: int, *, content: int, min_chunk: int, skip: int,
                draw: Callable[[int], int]) -> EttinSplit:
    """Ettin's chunk boundaries for a document of `length` tokens plus its [SEP] (see the module
    docstring); draw(high) -> an int in [0, high): the number of tokens a back-fill moves
    (called only when a back-fill happens, at most once per document)."""
    total = length + 1
    starts = list(range(0, total, content))
    spans = [(start, min(start + content, total)) for start in starts]
    skipped = backfilled = 0
    kept: list[list[int]] = []
    for i, (start, stop) in enumerate(spans):
        size = stop - start
        if size < skip and i != 0:
            skipped += size
            continue
        if size < min_chunk and kept:
            moved = int(draw(content - size))
            if moved:
                kept[-1][1] -= moved
                start -= moved
                backfilled = moved
        kept.append([start, stop])
    return EttinSplit(tuple((a, b) for a, b in kept), skipped, backfilled)


class _Chunks(gx.FlatMapTransform):
    """One document (a token array, or {"tokens", "source"}) -> its row segments, counting
    per source in `stats` ({source index: ChunkStats})."""

    max_fan_out = _MAX_CHUNKS_PER_DOCUMENT

    def __init__(self, seq_len: int, special: SpecialTokens, *, chunking: str,
                 min_chunk_tokens: int, skip_chunk_tokens: int, seed: int,
                 stats: dict[int, ChunkStats]):
        if chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
        self._content, self._min_chunk, self._skip = chunk_sizes(seq_len, min_chunk_tokens,
                                                                 skip_chunk_tokens)
        self._ettin = chunking == "ettin"
        self._seed = seed
        self._cls = np.array([special.cls], np.int32)
        self._sep = np.array([special.sep], np.int32)
        self.stats = stats

    def flat_map(self, element: Any) -> list[dict[str, np.ndarray]]:
        if isinstance(element, dict):
            tokens, source = element["tokens"], int(element["source"])
        else:
            tokens, source = element, 0
        tokens = np.asarray(tokens, np.int32)
        stats = self.stats.setdefault(source, ChunkStats())
        stats.documents += 1
        stats.tokens += len(tokens)
        chunks = self._ettin_chunks(tokens, stats) if self._ettin else [
            {"tokens": np.concatenate([self._cls, tokens[start:start + self._content],
                                       self._sep])}
            for start in range(0, max(len(tokens), 1), self._content)
        ]
        stats.chunks += len(chunks)
        return chunks

    def _ettin_chunks(self, tokens: np.ndarray, stats: ChunkStats) -> list[dict[str, np.ndarray]]:
        with_end = np.concatenate([tokens, self._sep])
        split = ettin_split(len(tokens), content=self._content, min_chunk=self._min_chunk,
                            skip=self._skip, draw=lambda high: backfill_draw(self._seed, tokens,
                                                                             high))
        if split.skipped:
            stats.skipped_chunks += 1
            stats.skipped_tokens += split.skipped
        if split.backfilled:
            stats.backfilled_chunks += 1
            stats.backfilled_tokens += split.backfilled
        chunks = []
        for i, (start, stop) in enumerate(split.spans):
            forced = not split.ends_document(i, len(tokens))
            ids = np.concatenate([self._cls, with_end[start:stop]]
                                 + ([self._sep] if forced else []))
            flags = np.zeros(len(ids), np.int32)
            flags[-1] = forced
            chunks.append({"tokens": ids, FORCED_SEP: flags})
        return chunks


def packed_rows(
    documents: grain.MapDataset, *, seq_len: int, special: SpecialTokens, bins: int,
    chunking: str = "bracketed", min_chunk_tokens: int = 512, skip_chunk_tokens: int = 32,
    seed: int = 0, stats: dict[int, ChunkStats] | None = None,
) -> grain.IterDataset:
    """Rows {"input_ids", "segment_ids", "positions"} (int32 [seq_len]), plus "forced_sep"
    (int32, 1 at a [SEP] that closes a chunk which is not a document's end) for "ettin"
    chunking, from `documents` (a dataset of token arrays, or of {"tokens", "source"} records
    as `sources.mixture` yields), in a deterministic order, in the calling thread.

    seed: the data seed ("ettin" back-fill draws). stats: filled with {source index:
    ChunkStats} as documents are read (the packer reads a few documents ahead of the rows).
    """
    chunk_sizes(seq_len)  # validates seq_len
    transform = _Chunks(seq_len, special, chunking=chunking, min_chunk_tokens=min_chunk_tokens,
                        skip_chunk_tokens=skip_chunk_tokens, seed=seed,
                        stats=stats if stats is not None else {})
    chunks = gx.FlatMapIterDataset(
        documents.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
        transform,
    )
    length_struct = {"tokens": seq_len}
    meta: tuple[str, ...] = ()
    if chunking == "ettin":
        length_struct[FORCED_SEP] = seq_len
        meta = (FORCED_SEP,)
    packed = gx.FirstFitPackIterDataset(
        chunks, length_struct=length_struct, num_packing_bins=bins, shuffle_bins=False,
        meta_features=meta,
    )
    return packed.map(_rename)


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {
        "input_ids": row["tokens"].astype(np.int32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
    }
    if FORCED_SEP in row:
        out[FORCED_SEP] = row[FORCED_SEP].astype(np.int32)
    return out


def packing_efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of row slots holding real tokens (segment id != 0)."""
    return float(np.count_nonzero(segment_ids)) / max(segment_ids.size, 1)
