"""`ettin-jax data inspect`: batches as arrays for debugging, a row as a reader sees it, and what
the rows drew from each source (token shares, chunking's skips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.objectives import IGNORE
from data_pipelines.packing import packing_efficiency

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "labels")


def dump_batches(batches: list[dict[str, np.ndarray]], path: str | Path) -> dict[str, tuple]:
    """Writes `batches` stacked to an .npz ([batches, rows, ...] per key); returns the shapes."""
    stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
    np.savez_compressed(path, **stacked)
    return {key: value.shape for key, value in stacked.items()}


def render_row(batch: dict[str, np.ndarray], tokenizer, *, row: int = 0, objective: str,
               max_tokens: int | None = None) -> str:
    """Row `row` of `batch`, decoded token by token. Documents start on a new line with their
    segment id; MLM targets show as [MASK→orig], [RAND new→orig] or [KEEP orig]; for CLM the
    summary counts the positions with a next-token target."""
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    segments = batch["segment_ids"][row]
    special = tokenizer.special_tokens
    pieces: list[str] = []
    limit = len(ids) if max_tokens is None else min(max_tokens, len(ids))
    for t in range(limit):
        if segments[t] == 0:
            pieces.append(f"\n[padding x {int(np.sum(segments[t:] == 0))}]")
            break
        if t == 0 or segments[t] != segments[t - 1]:
            pieces.append(f"\n<doc {segments[t]}> ")
        text = _token_text(tokenizer, int(ids[t]))
        if objective == "mlm" and labels[t] != IGNORE:
            original = _token_text(tokenizer, int(labels[t]))
            if ids[t] == special.mask:
                text = f"[MASK→{original}]"
            elif ids[t] != labels[t]:
                text = f"[RAND {text}→{original}]"
            else:
                text = f"[KEEP {original}]"
        pieces.append(text)
    targets = int(np.sum(labels != IGNORE))
    summary = (f"row {row}: {int(segments.max())} document chunks, packing "
               f"{packing_efficiency(segments):.1%}, "
               f"{targets} {'masked' if objective == 'mlm' else 'next-token'} targets")
    return summary + "".join(pieces)


def _token_text(tokenizer, token_id: int) -> str:
    special = tokenizer.special_tokens.as_dict()
    for name, value in special.items():
        if value == token_id:
            return f"[{name.upper()}]"
    return tokenizer.decode([token_id])


def source_summary(batches) -> str:
    """One line per source of a `BatchIterator`: documents and tokens its rows drew so far, the
    realised share of tokens (to compare with the sources' weights), and what chunking dropped
    or back-filled."""
    shares = batches.token_shares()
    lines = []
    for name, stats in batches.chunk_stats().items():
        lines.append(f"source {name}: {stats.documents} documents, {stats.tokens} tokens drawn "
                     f"(token share {shares[name]:.1%}), {stats.chunks} chunks, "
                     f"{stats.skipped_tokens} tokens skipped in {stats.skipped_chunks} short "
                     f"tails, {stats.backfilled_tokens} tokens back-filled into "
                     f"{stats.backfilled_chunks} tails")
    return "\n".join(lines)
