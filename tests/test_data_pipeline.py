"""Batches for both members: same rows, exact resume, process slices, worker independence;
prepared shards with resume; `data inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ByteTokenizer

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.objectives import IGNORE
from data_pipelines.pipeline import make_batch_iterator
from data_pipelines.prepare import PROGRESS_DIR, prepare
from data_pipelines.sources import SourceError, SourceStats, iter_texts, open_source

SEQ, BATCH = 64, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus: 40 documents of varied length, some longer than a row."""
    path = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(11)
    words = ["ettin", "encoder", "decoder", "pair", "mask", "token", "über", "naïve", "∑"]
    for i in range(40):
        count = int(rng.integers(1, 60))
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, count)) + f" #{i}")
    return path


def _iterator(data, objective="mlm", **kwargs):
    options = dict(seq_len=SEQ, global_batch_size=BATCH, seed=21, objective=objective,
                   tokenizer=ByteTokenizer())
    return make_batch_iterator(data, **{**options, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_encoder_and_decoder_see_the_same_rows(corpus):
    data = DataConfig(sources=(SourceConfig(str(corpus)),))
    for mlm, clm in zip(_take(_iterator(data, "mlm"), 3), _take(_iterator(data, "clm"), 3)):
        np.testing.assert_array_equal(mlm["segment_ids"], clm["segment_ids"])
        np.testing.assert_array_equal(mlm["positions"], clm["positions"])
        original = np.where(mlm["labels"] != IGNORE, mlm["labels"], mlm["input_ids"])
        np.testing.assert_array_equal(original, clm["input_ids"])
        assert mlm["input_ids"].shape == (BATCH, SEQ) and sorted(mlm) == sorted(clm)


def test_resume_is_bit_identical(corpus):
    data = DataConfig(sources=(SourceConfig(str(corpus)),))
    reference = _take(_iterator(data), 7)
    first = _iterator(data)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    resumed = _iterator(data)
    resumed.set_state(state)
    for expected, actual in zip(reference[4:], _take(resumed, 3)):
        _assert_same(expected, actual)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_union_is_the_global_batch(corpus, processes):
    data = DataConfig(sources=(SourceConfig(str(corpus)),))
    whole = _take(_iterator(data), 3)
    parts = [_take(_iterator(data, process_index=i, process_count=processes), 3)
             for i in range(processes)]
    for step in range(3):
        joined = {k: np.concatenate([p[step][k] for p in parts]) for k in whole[step]}
        _assert_same(whole[step], joined)
    # A state saved by one process layout restores onto another.
    single = _iterator(data)
    _take(single, 2)
    state = single.get_state()
    second_half = _iterator(data, process_index=1, process_count=2)
    second_half.set_state(state)
    np.testing.assert_array_equal(next(second_half)["input_ids"],
                                  whole[2]["input_ids"][BATCH // 2:])


def test_batches_do_not_depend_on_workers(corpus):
    serial = _take(_iterator(DataConfig(sources=(SourceConfig(str(corpus)),))), 3)
    threaded = _take(_iterator(DataConfig(sources=(SourceConfig(str(corpus)),), workers=3)), 3)
    for a, b in zip(serial, threaded):
        _assert_same(a, b)


def test_bad_process_layout_and_state():
    data = DataConfig()
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        _iterator(data, process_count=3)
    iterator = _iterator(data, global_batch_size=4)
    with pytest.raises(ValueError, match="no entry for rows"):
        iterator.set_state({"step": 1, "rows": {"0": {}}})


def test_prepare_resumes_and_matches_direct_tokenization(corpus, tmp_path):
    tokenizer = ByteTokenizer()
    source = SourceConfig(str(corpus))
    out = tmp_path / "prepared"
    manifest = prepare([source], tokenizer, out, documents_per_shard=7, workers=2,
                       progress=False)
    assert manifest["documents"] == 40 and len(manifest["shards"]) == 6
    direct = [tokenizer.encode(t) for t in iter_texts(source, SourceStats())]
    assert manifest["tokens"] == sum(len(d) for d in direct)
    opened = open_source(SourceConfig(str(out)), tokenizer)
    assert [d.tolist() for d in opened.dataset] == [d.tolist() for d in direct]

    # An interruption: the manifest and two shards were never finished.
    shard_bytes = (out / "shard-00003.array_record").read_bytes()
    (out / "manifest.json").unlink()
    (out / PROGRESS_DIR / "00003.json").unlink()
    (out / "shard-00005.array_record").unlink()
    with pytest.raises(SourceError, match="unfinished preparation"):
        open_source(SourceConfig(str(out)), tokenizer)
    resumed = prepare([source], tokenizer, out, documents_per_shard=7, workers=1,
                      progress=False)
    assert resumed == manifest
    assert (out / "shard-00003.array_record").read_bytes() == shard_bytes

    with pytest.raises(ValueError, match="other settings"):
        prepare([source], tokenizer, out, documents_per_shard=8, workers=1, progress=False)
    with pytest.raises(ValueError, match="not empty"):
        prepare([source], tokenizer, corpus, workers=1, progress=False)


def test_prepared_shards_feed_the_pipeline(corpus, tmp_path):
    tokenizer = ByteTokenizer()
    prepare([SourceConfig(str(corpus))], tokenizer, tmp_path / "p", workers=1, progress=False)
    from_text = _take(_iterator(DataConfig(sources=(SourceConfig(str(corpus)),))), 2)
    from_shards = _take(_iterator(DataConfig(sources=(SourceConfig(str(tmp_path / "p")),))), 2)
    for a, b in zip(from_text, from_shards):
        _assert_same(a, b)

    class OtherTokenizer(ByteTokenizer):
        vocab_size = 300

    with pytest.raises(SourceError, match="another tokenizer"):
        open_source(SourceConfig(str(tmp_path / "p")), OtherTokenizer())
    shutil.rmtree(tmp_path / "p")


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_tokenizer_prepare_inspect_end_to_end(corpus, tmp_path, capsys):
    """What a user runs: train a tokenizer, prepare shards, inspect MLM batches from a recipe."""
    from transformers import AutoTokenizer

    from ettin_jax.cli import main

    from data_pipelines.corpus import bundled_documents

    texts = tmp_path / "texts"
    texts.mkdir()
    for document in bundled_documents("train")[:3]:  # enough text for a 400-piece vocabulary
        (texts / document.name.replace("/", "_")).write_text(document.text)
    assert main(["tokenizer", "train", "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                 str(texts)]) == 0
    # Same command, same bytes: the tokenizer and the shards (whatever the worker count).
    assert main(["tokenizer", "train", str(texts), "--vocab-size", "400", "--out",
                 str(tmp_path / "again")]) == 0
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(tmp_path / "tok")
    assert main(["tokenizer", "train", "--vocab-size", "90000", "--out", str(tmp_path / "t2"),
                 str(texts)]) == 2
    assert "Vocabulary size too high" in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").mask_token_id == 4
    assert main(["data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "prepared"), "--workers", "1"]) == 0
    assert "prepared 40 documents" in capsys.readouterr().out
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "again"), str(corpus),
                 "--out", str(tmp_path / "prepared-again"), "--workers", "2",
                 "--documents-per-shard", "4096"]) == 0
    assert _tree_bytes(tmp_path / "prepared-again") == _tree_bytes(tmp_path / "prepared")

    recipe = "tests/recipes/tiny-one-phase.yaml"  # bundled sources, no tokenizer
    overrides = [f"data.sources=[{{path: {tmp_path / 'prepared'}}}]", "train.seq_len=48",
                 "train.global_batch_size=4"]
    out = tmp_path / "batches.npz"
    assert main(["data", "inspect", recipe, *overrides, "--objective", "mlm", "--batches", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[MASK→" in printed and "<doc 1>" in printed and "packing" in printed
    arrays = np.load(out)
    assert arrays["input_ids"].shape == (3, 4, 48) and arrays["labels"].shape == (3, 4, 48)

    assert main(["data", "inspect", recipe, *overrides[1:], "--objective", "clm"]) == 2
    assert "data.tokenizer is not set" in capsys.readouterr().err
