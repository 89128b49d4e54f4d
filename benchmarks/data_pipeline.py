"""Data pipeline throughput: `data prepare` (MB/s of text) and prepared shards -> MLM batches
(real tokens/s), on the bundled corpus.

    .venv/bin/python benchmarks/data_pipeline.py [--seq-len 1024] [--batch 64] [--batches 40]

Prints a Markdown table with the machine and the command, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.pipeline import make_batch_iterator
from data_pipelines.prepare import prepare
from data_pipelines.tokenizers import load_tokenizer, train_tokenizer
from provenance import print_provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer", help="an existing tokenizer directory (default: train)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            start = time.perf_counter()
            tokenizer = train_tokenizer(tmp / "tokenizer", vocab_size=args.vocab_size)
            print(f"trained tokenizer (vocab {tokenizer.vocab_size}) in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

        start = time.perf_counter()
        manifest = prepare([SourceConfig("bundled")], tokenizer, tmp / "prepared",
                           workers=args.workers, documents_per_shard=64, progress=False)
        prepare_s = time.perf_counter() - start

        data = DataConfig(sources=(SourceConfig(str(tmp / "prepared")),))
        batches = make_batch_iterator(data, seq_len=args.seq_len, global_batch_size=args.batch,
                                      seed=21, objective="mlm", tokenizer=tokenizer)
        for _ in range(3):
            next(batches)  # warm-up: file handles, first documents
        real = slots = 0
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
            real += int(np.count_nonzero(batch["segment_ids"]))
            slots += batch["segment_ids"].size
        pipeline_s = time.perf_counter() - start

    print_provenance()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| `data prepare`, {args.workers} workers | {manifest['text_bytes'] / 1e6 / prepare_s:.1f} "
          f"MB/s of text ({manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
          f"{prepare_s:.1f} s) |")
    print(f"| shards -> MLM batches (seq {args.seq_len}, batch {args.batch}), 1 thread | "
          f"{real / pipeline_s / 1e6:.2f} M real tokens/s ({slots / pipeline_s / 1e6:.2f} M "
          f"slots/s, packing {real / slots:.1%}) |")


if __name__ == "__main__":
    main()
