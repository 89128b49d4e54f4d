"""Sources: every format reads the documents it holds, bad input is counted or named."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ByteTokenizer

from data_pipelines import sources as sources_module
from data_pipelines.config import SourceConfig, parse_source
from data_pipelines.sources import (
    SourceError,
    SourceStats,
    iter_texts,
    mixture,
    open_source,
    source_files,
)


def _texts(source: SourceConfig) -> tuple[list[str], SourceStats]:
    stats = SourceStats()
    return list(iter_texts(source, stats)), stats


def test_text_files_one_document_per_file_or_blank_line_separated(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill first\n\nsame file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second\n")
    (tmp_path / ".hidden").write_text("never read")
    per_file, stats = _texts(SourceConfig(str(tmp_path)))
    assert per_file == ["first document\nstill first\n\nsame file", "second\n"]
    assert stats.documents == 2
    blank, _ = _texts(SourceConfig(str(tmp_path), documents="blank_lines"))
    assert blank == ["first document\nstill first\n", "same file", "second\n"]
    globbed, _ = _texts(SourceConfig(str(tmp_path / "**" / "*.md")))
    assert globbed == ["second\n"]


def test_jsonl_parquet_and_field_option(tmp_path):
    rows = [{"body": f"doc {i}", "id": i} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"body": [r["body"] for r in rows]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        texts, _ = _texts(SourceConfig(str(tmp_path / name), field="body"))
        assert texts == [r["body"] for r in rows]
    with pytest.raises(SourceError, match=r"d.jsonl:1: no field 'text'.*\['body', 'id'\]"):
        _texts(SourceConfig(str(tmp_path / "d.jsonl")))
    with pytest.raises(SourceError, match="d.parquet: no column 'text'"):
        _texts(SourceConfig(str(tmp_path / "d.parquet")))


def test_malformed_json_line_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(SourceError, match=r"d.jsonl:2: malformed JSON line"):
        _texts(SourceConfig(str(tmp_path / "d.jsonl")))
    # Preparation skips it instead, counted and named (the first of them).
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n{"text": 1}\n')
    stats = SourceStats()
    texts = list(iter_texts(SourceConfig(str(tmp_path / "d.jsonl")), stats,
                            skip_bad_records=True))
    assert texts == ["ok"] and stats.bad_records_skipped == 2
    assert stats.first_bad_record.endswith("d.jsonl:2: malformed JSON line: Expecting value")


def test_invalid_utf8_empty_and_enormous_documents_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "MAX_DOCUMENT_CHARS", 100)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "empty.txt").write_text("   \n\n")
    (tmp_path / "huge.txt").write_text("".join(f"line {i:03d}\n" for i in range(60)))
    texts, stats = _texts(SourceConfig(str(tmp_path)))
    assert texts[0] == "caf\ufffd au lait"
    assert stats.invalid_utf8_replaced == 1 and stats.empty_skipped == 1
    assert stats.enormous_split == 1
    huge = texts[1:]
    assert all(len(t) <= 100 for t in huge) and "".join(huge) == (tmp_path / "huge.txt").read_text()
    assert all(t.endswith("\n") for t in huge)  # cut at line ends
    assert stats.documents == len(texts)


def test_missing_and_empty_sources_are_named(tmp_path):
    with pytest.raises(SourceError, match="'nowhere/x.txt': no such file or directory"):
        _texts(SourceConfig("nowhere/x.txt"))
    with pytest.raises(SourceError, match="matches no files"):
        source_files(SourceConfig(str(tmp_path / "*.txt")))
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(SourceError, match=r"holds no documents \(1 empty ones skipped\)"):
        open_source(SourceConfig(str(tmp_path)), ByteTokenizer())
    with pytest.raises(SourceError, match="unknown split 'dev'"):
        _texts(parse_source("bundled:dev"))


def test_bundled_corpus_is_text_plus_code_with_a_heldout_split():
    from data_pipelines.corpus import bundled_documents

    train, heldout = bundled_documents("train"), bundled_documents("heldout")
    kinds = {d.kind for d in train}
    assert kinds == {"text", "code"}
    assert {d.name for d in train}.isdisjoint(d.name for d in heldout)
    assert sum(d.text.count("\n") for d in heldout) > 2000
    assert "shakespeare/macbeth_gut.txt" in {d.name for d in heldout}
    texts, _ = _texts(parse_source("bundled"))
    assert len(texts) >= len(train)


def test_tfds_array_record_dataset_without_tensorflow(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds


    class TinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(7):
                yield i, {"body": f"tfds document {i}"}

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = parse_source("tfds:tiny_text:train", field="body")
    source = SourceConfig(source.path, kind="tfds", split="train", field="body",
                          data_dir=str(tmp_path))
    texts, _ = _texts(source)
    assert sorted(texts) == [f"tfds document {i}" for i in range(7)]
    # In units of 3 records (what distributed preparation reads apart): the same documents.
    monkeypatch.setattr(sources_module, "TFDS_RECORDS_PER_UNIT", 3)
    units = sources_module.source_units(source)
    assert [(u.start, u.stop) for u in units] == [(0, 3), (3, 6), (6, 7)]
    assert [t for u in units for t in iter_texts(source, SourceStats(), units=[u])] == texts


def test_mixture_follows_weights(tmp_path, rng):
    tokenizer = ByteTokenizer()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"{i}.txt").write_text(name * (i + 1))
    opened = [open_source(SourceConfig(str(tmp_path / "a"), weight=3.0), tokenizer),
              open_source(SourceConfig(str(tmp_path / "b"), weight=1.0), tokenizer)]
    mixed = mixture(opened, seed=int(rng.integers(1 << 30)))
    # Equal document lengths: token shares are document shares.
    first = [tokenizer.decode(mixed[i]["tokens"])[0] for i in range(400)]
    assert [mixed[i]["source"] for i in range(400)] == [int(c == "b") for c in first]
    assert 0.7 < first.count("a") / 400 < 0.8
    # Every document of a source comes once per epoch of that source.
    a_docs = [tokenizer.decode(mixed[i]["tokens"]) for i in range(400) if first[i] == "a"][:20]
    assert sorted(a_docs) == sorted("a" * (i + 1) for i in range(20))
    assert not np.array_equal(mixed[0]["tokens"], mixture(opened, seed=1)[0]["tokens"]) or \
        not np.array_equal(mixed[1]["tokens"], mixture(opened, seed=1)[1]["tokens"])
