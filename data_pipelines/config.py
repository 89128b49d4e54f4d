"""What the data section of a recipe says: the sources of documents, the tokenizer, packing and
the MLM mask ratio (the one field where Ettin's encoder and decoder differ)."""

from __future__ import annotations

import dataclasses
from typing import Literal

SourceKind = Literal["auto", "bundled", "text", "jsonl", "parquet", "tfds", "prepared"]


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
    weight: relative sampling weight in a mixture (by documents).
    field: JSON Lines / Parquet column / TFDS feature holding the text.
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

    def __post_init__(self) -> None:
        _require(bool(self.path), "path must not be empty")
        _require(self.weight > 0, f"weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How training rows are made, shared by both members of a pair.

    mlm_mask_ratio: fraction of eligible tokens the encoder predicts (Ettin: 0.30, then 0.15).
    sources: training documents (a weighted mixture); the bundled corpus by default.
    heldout: evaluation documents.
    tokenizer: a tokenizer directory or file (`ettin-jax tokenizer train` writes one); None uses
      the tokenizer saved with prepared sources.
    packing_bins: open rows the first-fit packer fills at once (more: fuller rows).
    workers: threads that build rows in parallel (0: in the calling thread). Batches do not
      depend on it.
    """

    mlm_mask_ratio: float = 0.30
    sources: tuple[SourceConfig, ...] = (SourceConfig("bundled"),)
    heldout: tuple[SourceConfig, ...] = (SourceConfig("bundled", split="heldout"),)
    tokenizer: str | None = None
    packing_bins: int = 4
    workers: int = 0

    def __post_init__(self) -> None:
        _require(0.0 < self.mlm_mask_ratio < 1.0,
                 f"mlm_mask_ratio must be in (0, 1), got {self.mlm_mask_ratio}")
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
