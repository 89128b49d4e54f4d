"""`data prepare --runner beam`: Apache Beam's DirectRunner on two worker processes writes what the
local runner writes (shards byte for byte, the manifest) from text files, JSON Lines and Ettin's
token ids in MDS shards, counts bad records instead of failing, and resumes an interrupted
preparation without redoing finished work."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.config import SourceConfig
from data_pipelines.prepare import PROGRESS_DIR, prepare
from data_pipelines.sources import SourceStats, iter_documents, source_units
from data_pipelines.tokenizers import load_tokenizer
from ettin_jax.cli import main

WORDS = ["ettin", "encoder", "decoder", "pair", "mask", "über", "naïve", "∑", "def", "return"]


def _texts(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 80)))) + f" {rng.integers(1 << 30)}"
            for _ in range(count)]


@pytest.fixture
def sources(tmp_path, rng, tokenizer_dir) -> list[SourceConfig]:
    """Three units of text files; a JSON Lines file with two bad records and an empty one; MDS
    shards (units too) of bracketed token ids, as Ettin stored them (in a column named `text`,
    so that one --field serves all three)."""
    from mosaic_streaming import MDSWriter

    texts = tmp_path / "texts"
    texts.mkdir()
    for index, text in enumerate(_texts(rng, 3)):
        (texts / f"{index}.txt").write_text(text)
    lines = [json.dumps({"text": t}) for t in _texts(rng, 30)]
    lines[7] = '{"text": "cut off'  # malformed
    lines[12] = json.dumps({"body": "no text field"})
    lines[20] = json.dumps({"text": ""})
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = load_tokenizer(tokenizer_dir)
    cls, sep = tokenizer.special_tokens.cls, tokenizer.special_tokens.sep
    with MDSWriter(out=str(tmp_path / "mds"), columns={"text": "ndarray:uint32"},
                   compression="zstd", size_limit=400) as writer:
        for text in _texts(rng, 12):
            ids = [cls, *tokenizer.encode(text).tolist(), sep]
            writer.write({"text": np.asarray(ids, np.uint32)})
    return [SourceConfig(str(texts)), SourceConfig(str(tmp_path / "mixed.jsonl")),
            SourceConfig(str(tmp_path / "mds"))]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_beam_writes_what_the_local_runner_writes_and_resumes(sources, tokenizer_dir, tmp_path,
                                                             capsys):
    tokenizer = load_tokenizer(tokenizer_dir)
    local = prepare(sources, tokenizer, tmp_path / "local", documents_per_shard=5, workers=1,
                    progress=False)
    beam_out = tmp_path / "beam"
    command = ["data", "prepare", *[s.path for s in sources], "--tokenizer", str(tokenizer_dir),
               "--out", str(beam_out), "--documents-per-shard", "5", "--runner", "beam",
               "--workers", "2", "--", "--direct_running_mode=multi_processing"]
    assert len(source_units(sources[2])) > 2  # MDS shards
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "prepared 42 documents" in printed
    assert "warning: 2 bad records skipped" in printed and "mixed.jsonl:8: malformed" in printed

    manifest = json.loads((beam_out / "manifest.json").read_text())
    assert manifest == local and len(manifest["shards"]) == 9
    assert _files(beam_out) == _files(tmp_path / "local")
    stats = manifest["source_stats"][sources[1].path]
    assert stats["bad_records_skipped"] == 2 and stats["empty_skipped"] == 1
    # The multiset of documents' token sequences: the good records tokenized, the ids kept.
    direct = Counter(tuple(tokenizer.encode(d) if isinstance(d, str) else d)
                     for source in sources for d in iter_documents(
                         source, SourceStats(), tokenizer=tokenizer, skip_bad_records=True))
    from data_pipelines.prepare import open_prepared

    dataset, count = open_prepared(beam_out, tokenizer)
    assert Counter(tuple(d.tolist()) for d in dataset) == direct and count == 42

    # Interrupted: no manifest, shard 2 never written, shard 4 written but not recorded, one
    # unit never counted. The rerun redoes exactly those and leaves finished shards alone.
    (beam_out / "manifest.json").unlink()
    (beam_out / "shard-00002.array_record").unlink()
    (beam_out / PROGRESS_DIR / "00002.json").unlink()
    (beam_out / PROGRESS_DIR / "00004.json").unlink()
    (beam_out / PROGRESS_DIR / "units" / "0000001.json").unlink()
    untouched = os.stat(beam_out / "shard-00005.array_record").st_mtime_ns
    # (Beam's in-process DirectRunner this time: the same pipeline, without starting workers.)
    assert main([*command[:-1], "--direct_running_mode=in_memory"]) == 0
    assert json.loads((beam_out / "manifest.json").read_text()) == local
    assert _files(beam_out) == _files(tmp_path / "local")
    assert os.stat(beam_out / "shard-00005.array_record").st_mtime_ns == untouched
    # Finished: the same command returns the manifest without running a pipeline.
    assert main(command[:-2]) == 0 and "prepared 42 documents" in capsys.readouterr().out


def test_beam_options_need_the_beam_runner(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "bundled", "--tokenizer", "t", "--out", "o", "--",
              "--runner=DataflowRunner"])
    assert exit_info.value.code == 2
    assert "are Beam pipeline options; add --runner beam" in capsys.readouterr().err
