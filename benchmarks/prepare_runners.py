"""`data prepare` on its two runners, the local one and Apache Beam's DirectRunner, against a plain
batch encode with HuggingFace `tokenizers` on one core: documents/s, MB/s of text, and the rate
per core as a share of the plain encode's.

    .venv/bin/python benchmarks/prepare_runners.py [--workers 2] [--copies 1]

The corpus is the bundled one written as JSON Lines, `--copies` files of it (the units Beam
spreads over its workers). The tokenizer is a byte-level BPE trained with `tokenizers` on it
(vocab 8192: ModernBERT's kind, which Ettin uses). Every tokenizer runs on one thread
(RAYON_NUM_THREADS=1), so that the runners' parallelism is their worker processes. Also checks
that both runners wrote the same shards. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before `tokenizers` starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from data_pipelines.config import SourceConfig  # noqa: E402
from data_pipelines.corpus import bundled_documents  # noqa: E402
from data_pipelines.prepare import prepare  # noqa: E402
from data_pipelines.tokenizers import SPECIAL_TOKEN_TEXT, load_tokenizer  # noqa: E402
from provenance import print_provenance  # noqa: E402


def train_bpe(texts: list[str], out: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json with the project's special tokens, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKEN_TEXT.values())
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    texts = [d.text for d in bundled_documents("train")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_file = train_bpe(texts, tmp / "tokenizer", args.vocab_size)
        corpus = tmp / "corpus"
        corpus.mkdir()
        for copy in range(args.copies):
            (corpus / f"copy{copy}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in texts))
        documents = len(texts) * args.copies
        megabytes = sum(len(t.encode()) for t in texts) * args.copies / 1e6

        from tokenizers import Tokenizer

        plain = Tokenizer.from_file(str(tokenizer_file))
        start = time.perf_counter()
        for _ in range(args.copies):
            plain.encode_batch(texts, add_special_tokens=False)
        rows = [("plain `tokenizers` encode_batch, 1 thread", 1, time.perf_counter() - start)]

        tokenizer = load_tokenizer(tokenizer_file)
        outputs = {}
        for runner in ("local", "beam"):
            outputs[runner] = tmp / runner
            start = time.perf_counter()
            prepare([SourceConfig(str(corpus))], tokenizer, outputs[runner],
                    documents_per_shard=64, workers=args.workers, progress=False, runner=runner)
            name = {"local": "`data prepare` (local runner)",
                    "beam": "`data prepare --runner beam` (DirectRunner, multi_processing)"}[runner]
            rows.append((f"{name}, {args.workers} worker processes", args.workers,
                         time.perf_counter() - start))
        same = all((outputs["local"] / p.name).read_bytes() == p.read_bytes()
                   for p in outputs["beam"].glob("*.array_record")) and (
            (outputs["local"] / "manifest.json").read_text()
            == (outputs["beam"] / "manifest.json").read_text())

    print_provenance(f"corpus: the bundled corpus x {args.copies} as JSON Lines: {documents:,} "
                     f"documents, {megabytes:.1f} MB; BPE vocab {args.vocab_size}; both runners "
                     f"wrote identical shards and manifests: {'yes' if same else 'NO'}")
    print("| tokenizing | cores | seconds | documents/s | MB/s | MB/s per core "
          "| per core / plain |")
    print("|---|---|---|---|---|---|---|")
    plain_per_core = megabytes / rows[0][2]
    for name, cores, seconds in rows:
        per_core = megabytes / seconds / cores
        print(f"| {name} | {cores} | {seconds:.2f} | {documents / seconds:,.0f} | "
              f"{megabytes / seconds:.2f} | {per_core:.2f} | {per_core / plain_per_core:.2f} |")


if __name__ == "__main__":
    main()
