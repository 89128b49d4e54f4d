"""What the data section of a recipe says: the sources of documents, the tokenizer, chunking and
packing, and the MLM masking (the one field where Ettin's encoder and decoder differ)."""

from __future__ import annotations

import dataclasses
from typing import Literal

SourceKind = Literal["auto", "bundled", "text", "jsonl", "parquet", "tfds", "prepared",
                     "mds"]
Chunking = Literal["bracketed", "ettin"]
MlmMasking = Literal["exact", "bernoulli"]
CHUNKINGS = ("bracketed", "ettin")
MLM_MASKINGS = ("exact", "bernoulli")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of documents.

    path: a file, a directory (every file inside, recursively), or a glob; "bundled" for the
      bundled corpus; a TFDS dataset name for kind "tfds"; the output directory of
      `ettin-jax data prepare` for kind "prepared".
    kind: "auto" infers it: "bundled", a directory with manifest.json is "prepared", *.jsonl /
      *.json is "jsonl", *.parquet is "parquet", anything else is "text".
      kind "mds": a mosaicml-streaming (MDS) directory with index.json (auto-detected when it
      has no manifest.json), as Ettin published its data; `field` names the column: a token
      column (e.g. Ettin's `input_ids`) keeps its ids (less a leading [CLS] and trailing [SEP],
      which the packer adds), a text column is tokenized.
    weight: relative share of TOKENS in a mixture (as Ettin's proportions: DCLM 49%, ...): a
      source's documents are drawn with probability proportional to weight / its mean document
      length in tokens (see `data_pipelines.sources.mixture`).
    field: JSON Lines / Parquet column / TFDS feature holding the text; an MDS or Parquet column
      of integer arrays holds token ids instead (Ettin's data and `ettin-data-order`), kept as
      they are less one [CLS] / [SEP] bracket.
    shuffle: False reads the documents in the source's own order, every epoch, instead of
      shuffling them (replaying a published order such as Ettin's `ettin-data-order`).
    documents: text files: "file" (one document per file) or "blank_lines" (documents separated
      by blank lines).
    split: split of the bundled corpus or the TFDS dataset ("train", "heldout", ...).
    data_dir: TFDS data directory (None: TFDS's default).
    """

    path: str
    kind: SourceKind = "auto"
    weight: float = 1.0
    field: str = "text"
    documents: Literal["file", "blank_lines"] = "file"
    split: str = "train"
    data_dir: str | None = None
    shuffle: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.path), "path must not be empty")
        _require(self.weight > 0, f"weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How training rows are made, shared by both members of a pair.

    mlm_mask_ratio: fraction of eligible tokens the encoder predicts (Ettin: 0.30, then 0.15).
      Held-out evaluation always masks 15%, as Ettin's eval loader did.
    mlm_masking: how the encoder's targets are chosen among eligible tokens (not padding, not a
      special token). "exact": round(mlm_mask_ratio * eligible) per row. "bernoulli": each
      eligible token independently with probability mlm_mask_ratio, as Ettin's collator
      (transformers' DataCollatorForLanguageModeling) did; its random replacements are then
      drawn from the whole vocabulary (specials included), as transformers' are. Both: 80%
      [MASK], 10% a random id, 10% unchanged.
    chunking: how documents become row segments (`data_pipelines.packing`). "bracketed": every
      chunk of up to seq_len - 2 tokens is [CLS] ... [SEP] and the decoder learns [SEP] at every
      chunk end. "ettin": Ettin's chunking: [SEP] (EOS) appended to the document only, short
      tails back-filled from the previous chunk, tiny tails dropped (and counted); the decoder
      never predicts a [SEP] that closes a chunk which is not a document's end.
    min_chunk_tokens: "ettin" chunking: a document's last chunk shorter than this is back-filled
      with a random number of tokens from the end of the previous chunk (Ettin: 512). Capped at
      seq_len // 2, so rows shorter than Ettin's 1024 keep Ettin's proportion.
    skip_chunk_tokens: "ettin" chunking: a chunk shorter than this is dropped unless it is the
      document's first (Ettin: 32; 0 never drops). Capped at seq_len // 32, for the same reason.
    sources: training documents (a weighted mixture); the bundled corpus by default.
    heldout: evaluation documents.
    tokenizer: a tokenizer directory or file (`ettin-jax tokenizer train` writes one); None uses
      the tokenizer saved with prepared sources.
    packing_bins: open rows the first-fit packer fills at once (more: fuller rows).
    workers: threads that build rows in parallel (0: in the calling thread). Batches do not
      depend on it.
    """

    mlm_mask_ratio: float = 0.30
    mlm_masking: MlmMasking = "exact"
    chunking: Chunking = "bracketed"
    min_chunk_tokens: int = 512
    skip_chunk_tokens: int = 32
    sources: tuple[SourceConfig, ...] = (SourceConfig("bundled"),)
    heldout: tuple[SourceConfig, ...] = (SourceConfig("bundled", split="heldout"),)
    tokenizer: str | None = None
    packing_bins: int = 4
    workers: int = 0

    def __post_init__(self) -> None:
        _require(0.0 < self.mlm_mask_ratio < 1.0,
                 f"mlm_mask_ratio must be in (0, 1), got {self.mlm_mask_ratio}")
        _require(self.mlm_masking in MLM_MASKINGS,
                 f"mlm_masking must be one of {MLM_MASKINGS}, got {self.mlm_masking!r}")
        _require(self.chunking in CHUNKINGS,
                 f"chunking must be one of {CHUNKINGS}, got {self.chunking!r}")
        _require(self.min_chunk_tokens >= 1,
                 f"min_chunk_tokens must be >= 1, got {self.min_chunk_tokens}")
        _require(self.skip_chunk_tokens >= 0,
                 f"skip_chunk_tokens must be >= 0, got {self.skip_chunk_tokens}")
        _require(len(self.sources) >= 1, "sources must list at least one source")
        _require(self.packing_bins >= 1, f"packing_bins must be >= 1, got {self.packing_bins}")
        _require(self.workers >= 0, f"workers must be >= 0, got {self.workers}")


def parse_source(text: str, **fields) -> SourceConfig:
    """A source from its command-line form: a path or glob, "bundled[:SPLIT]" or
    "tfds:NAME[:SPLIT]"; `fields` set the other SourceConfig fields."""
    head, _, rest = text.partition(":")
    if head == "bundled":
        return SourceConfig("bundled", kind="bundled", split=rest or "train", **fields)
    if head == "tfds" and rest:
        name, _, split = rest.partition(":")
        return SourceConfig(name, kind="tfds", split=split or "train", **fields)
    return SourceConfig(text, **fields)
