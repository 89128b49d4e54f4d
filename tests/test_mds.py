"""MDS directories (mosaicml-streaming's format, Ettin's released data) as sources: shards written
by mosaicml-streaming's own MDSWriter read back through `open_source` equal what was written and
what mosaicml-streaming's StreamingDataset reads, in every compression ettin-jax decompresses, in
Ettin's layout (a root index merged over component directories, shards left decompressed) and
from a bucket, and a model trains on them exactly as on the same documents given as text."""

from __future__ import annotations

import pickle
import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ByteTokenizer
from mosaic_streaming import MDSWriter, StreamingDataset, merge_index

from data_pipelines.config import SourceConfig
from data_pipelines.mds import iter_mds_documents, open_shard, read_index, read_sample
from data_pipelines.sources import SourceError, SourceStats, iter_texts, open_source, source_kind

# Ettin's final chunks: input_ids ndarray:uint32 and an id (MDS_COLS_OUTPUT_ONLY); a text column
# and two scalars besides, to check the decoding of every column against mosaicml-streaming's.
COLUMNS = {"input_ids": "ndarray:uint32", "text": "str", "id": "str", "len": "int",
           "score": "float32", "any": "ndarray"}
ALPHABET = list(string.ascii_letters + string.digits + "  \n.,é中—")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Decompressed shards go to this test's directory, not the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _texts(rng, count: int) -> list[str]:
    """Random texts, none blank (text sources skip blank documents)."""
    return [str(rng.choice(list(string.ascii_letters)))
            + "".join(rng.choice(ALPHABET, int(rng.integers(0, 90)))) for _ in range(count)]


def _write(out: Path, texts: list[str], rng, *, compression: str | None = "zstd",
           size_limit: int = 4096) -> list[dict]:
    """Writes `texts` with MDSWriter as Ettin stored documents: ids bracketed [CLS] ... [SEP]
    (ByteTokenizer's 2 and 3) as uint32, except a few left bare; returns the samples."""
    tokenizer = ByteTokenizer()
    samples = []
    with MDSWriter(out=str(out), columns=COLUMNS, compression=compression,
                   size_limit=size_limit, hashes=["sha1", "xxh64"]) as writer:
        for number, text in enumerate(texts):
            ids = tokenizer.encode(text).astype(np.uint32)
            if rng.random() < 0.8:
                ids = np.concatenate([[2], ids, [3]]).astype(np.uint32)
            sample = {"input_ids": ids, "text": text, "id": f"doc-{number}",
                      "len": int(rng.integers(-2**40, 2**40)), "score": np.float32(rng.random()),
                      "any": rng.integers(-99, 99, (int(rng.integers(1, 4)), 2)).astype(np.int16)}
            writer.write(sample)
            samples.append(sample)
    return samples


def _expected_tokens(texts: list[str]) -> list[np.ndarray]:
    return [ByteTokenizer().encode(t) for t in texts]


def _mosaic_reads(directory: Path, scratch: Path) -> list[dict]:
    """Every sample as mosaicml-streaming's StreamingDataset reads it (from a copy: it
    decompresses next to the shards and may remove the compressed files)."""
    copy = scratch / f"mosaic-{directory.name}"
    shutil.copytree(directory, copy)
    dataset = StreamingDataset(local=str(copy), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def _same_value(ours, theirs) -> bool:
    if isinstance(theirs, np.ndarray):
        return ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    return type(ours) is type(theirs) and ours == theirs


@pytest.mark.parametrize("compression", ["zstd", None, "gz", "bz2"])
def test_shards_written_by_mosaicml_streaming_read_back(tmp_path, compression):
    """Token ids come back as int32 without their [CLS]/[SEP] brackets, the text column comes
    back tokenized, the document count is the index's, the mean length exact (5 shards), the
    source survives pickling; every column of every sample equals StreamingDataset's reading."""
    rng = np.random.default_rng()
    texts = _texts(rng, 60)
    samples = _write(tmp_path / "mds", texts, rng, compression=compression)
    tokenizer = ByteTokenizer()
    index = read_index(tmp_path / "mds")
    assert 2 <= len(index.shards) <= 8 and index.documents == len(texts)

    tokens = open_source(SourceConfig(str(tmp_path / "mds"), kind="mds", field="input_ids"),
                         tokenizer)
    assert tokens.stats.documents == len(texts)
    expected = _expected_tokens(texts)
    for i, want in enumerate(expected):
        assert tokens.dataset[i].dtype == np.int32
        np.testing.assert_array_equal(tokens.dataset[i], want)
    assert tokens.mean_tokens() == pytest.approx(np.mean([len(t) for t in expected]))
    unpickled = pickle.loads(pickle.dumps(tokens.dataset))
    np.testing.assert_array_equal(unpickled[len(texts) - 1], expected[-1])

    text = open_source(SourceConfig(str(tmp_path / "mds"), kind="mds", field="text"), tokenizer)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(text.dataset[i], want)

    theirs = _mosaic_reads(tmp_path / "mds", tmp_path)
    ours = []
    for shard in index.shards:
        mapped = open_shard(index.path, shard)
        ours += [read_sample(shard, mapped, i) for i in range(shard.samples)]
    assert len(ours) == len(theirs) == len(samples)
    for mine, reference, written in zip(ours, theirs, samples):
        assert set(mine) == set(reference) == set(COLUMNS)
        for name in COLUMNS:
            assert _same_value(mine[name], reference[name]), (name, mine[name], reference[name])
        np.testing.assert_array_equal(mine["input_ids"], written["input_ids"])
        assert mine["text"] == written["text"] and mine["len"] == written["len"]


def test_ettin_layout_merged_root_index_and_decompressed_shards(tmp_path):
    """Ettin's layout: component directories merged into a root index.json (mosaicml-streaming's
    merge_index, as make_recursive_root.py does), read in the index's order, auto-detected; with
    the compressed files replaced by raw ones (Ettin's decompress.py) the same documents come
    back; iter_mds_documents streams them in the same order."""
    rng = np.random.default_rng()
    root = tmp_path / "train"
    components = {"books": _texts(rng, 25), "dclm": _texts(rng, 30)}
    for name, texts in components.items():
        _write(root / name, texts, rng, size_limit=1024)
    merge_index([str(root / name / "index.json") for name in components], str(root))
    expected = _expected_tokens(components["books"] + components["dclm"])
    assert source_kind(SourceConfig(str(root))) == "mds"
    assert source_kind(SourceConfig(str(root / "books"))) == "mds"
    source = SourceConfig(str(root), field="input_ids")
    opened = open_source(source, ByteTokenizer())
    basenames = [shard.zip.basename for shard in read_index(root).shards]
    assert basenames[0] == "books/shard.00000.mds.zstd" and basenames[-1].startswith("dclm/")
    assert len(opened.dataset) == len(expected)
    order = rng.permutation(len(expected))  # random access across shards
    for i in order:
        np.testing.assert_array_equal(opened.dataset[int(i)], expected[i])
    theirs = _mosaic_reads(root, tmp_path)
    for i, sample in enumerate(theirs):
        stripped = sample["input_ids"]
        stripped = stripped[1:] if stripped[0] == 2 else stripped
        stripped = stripped[:-1] if stripped[-1] == 3 else stripped
        np.testing.assert_array_equal(opened.dataset[i], stripped)

    import zstandard

    for shard in read_index(root).shards:  # decompress.py --decompress --delete_zip
        packed = (root / shard.zip.basename).read_bytes()
        (root / shard.raw.basename).write_bytes(zstandard.ZstdDecompressor().decompress(
            packed, max_output_size=shard.raw.bytes))
        (root / shard.zip.basename).unlink()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    streamed = list(iter_mds_documents(source, ByteTokenizer()))
    assert len(streamed) == len(expected)
    for got, want in zip(streamed, expected):
        np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "cache").exists()  # raw shards are read where they lie


def test_text_column_feeds_iter_texts(tmp_path):
    """A text column is a text-like source too (tokenizer training, `data prepare`)."""
    rng = np.random.default_rng()
    texts = _texts(rng, 12)
    _write(tmp_path / "mds", texts, rng)
    assert list(iter_texts(SourceConfig(str(tmp_path / "mds")), SourceStats())) == texts
    with pytest.raises(SourceError, match="holds token ids, not text"):
        list(iter_texts(SourceConfig(str(tmp_path / "mds"), field="input_ids"), SourceStats()))


def test_errors_name_the_directory_column_and_codec(tmp_path):
    rng = np.random.default_rng()
    tokenizer = ByteTokenizer()
    _write(tmp_path / "nested" / "part", _texts(rng, 3), rng)
    with pytest.raises(SourceError, match="no index.json; its sub-directories .'part'. hold"):
        open_source(SourceConfig(str(tmp_path / "nested"), kind="mds"), tokenizer)

    with MDSWriter(out=str(tmp_path / "ettin"), columns={"input_ids": "ndarray:uint32",
                                                         "id": "str"}) as writer:
        for i in range(4):
            writer.write({"input_ids": rng.integers(5, 261, 9).astype(np.uint32), "id": str(i)})
    with pytest.raises(SourceError) as caught:
        open_source(SourceConfig(str(tmp_path / "ettin")), tokenizer)  # field defaults to text
    message = str(caught.value)
    assert "no column 'text'" in message and "id (str), input_ids (ndarray:uint32)" in message
    assert "`field: input_ids`" in message

    small = ByteTokenizer()
    small.vocab_size = 7
    opened = open_source(SourceConfig(str(tmp_path / "ettin"), field="input_ids"), small)
    with pytest.raises(SourceError, match=r"column 'input_ids' sample 0: token id \d+ is "
                                          r"outside the vocabulary \[0, 7\)"):
        opened.dataset[0]

    _write(tmp_path / "brotli", _texts(rng, 5), rng, compression="br")
    with pytest.raises(SourceError, match=r"shard.00000.mds.br: compression 'br' is not "
                                          r"supported \(supported: none, zstd, gz, bz2\)"):
        open_source(SourceConfig(str(tmp_path / "brotli"), field="input_ids"), tokenizer)

    _write(tmp_path / "damaged", _texts(rng, 20), rng, compression=None)
    shard = tmp_path / "damaged" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-1])
    opened = open_source(SourceConfig(str(tmp_path / "damaged"), field="input_ids"), tokenizer)
    with pytest.raises(SourceError, match="shard.00000.mds: .* bytes, but the index says"):
        opened.dataset[0]


def test_a_model_trains_on_mds_token_ids_as_on_the_same_text(tmp_path):
    """The trainer reads an MDS token column end to end: three steps on it give the losses of
    the same documents given as JSON Lines text (tokenized to the same ids)."""
    import json

    from ettin_jax.config import load_recipe
    from ettin_jax.config.schema import MeshConfig
    from ettin_jax.training.mesh import make_mesh
    from ettin_jax.training.metrics import read_metrics
    from ettin_jax.training.trainer import train_member

    rng = np.random.default_rng()
    texts = _texts(rng, 80)
    _write(tmp_path / "mds", texts, rng)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tiny = Path(__file__).resolve().parent / "recipes" / "tiny-one-phase.yaml"
    mesh = make_mesh(MeshConfig(-1, 1), jax.devices()[:2])
    losses = {}
    for name, source in [("mds", f"{{path: {tmp_path / 'mds'}, field: input_ids}}"),
                         ("text", f"{{path: {tmp_path / 'docs.jsonl'}}}")]:
        recipe = load_recipe(tiny, ["train.seq_len=64", "train.global_batch_size=8",
                                    "model.num_layers=2", "train.steps=3",
                                    "logging.every_steps=1", f"data.sources=[{source}]"])
        train_member(recipe, "mlm", tmp_path / name, tokenizer=ByteTokenizer(), mesh=mesh)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert len(losses["mds"]) == 3 and np.all(np.isfinite(losses["mds"]))
    assert losses["mds"] == losses["text"]


def test_an_mds_directory_in_a_bucket_reads_like_a_local_one(tmp_path):
    """s3:// (moto's server on loopback): kind inferred, the index read from the bucket, each
    shard fetched to the local cache on the first read of one of its documents."""
    from object_stores import BUCKET, S3Server, restore_environment, set_environment

    from ettin_jax import storage

    rng = np.random.default_rng()
    texts = _texts(rng, 40)
    _write(tmp_path / "mds", texts, rng)
    with S3Server() as s3:
        before = set_environment(s3.env)
        try:
            url = f"s3://{BUCKET}/ettin/train"
            storage.upload_tree(tmp_path / "mds", url)
            opened = open_source(SourceConfig(url, field="input_ids"), ByteTokenizer())
            assert source_kind(SourceConfig(url)) == "mds"
            cached = list((tmp_path / "cache").rglob("shard.*"))
            assert not cached  # nothing fetched before a document is read
            for i in rng.permutation(len(texts)):
                np.testing.assert_array_equal(opened.dataset[int(i)],
                                              ByteTokenizer().encode(texts[i]))
            # `train` checks a recipe's sources before it starts: this one passes, a typo not.
            from ettin_jax.config import load_recipe
            from ettin_jax.errors import ConfigError
            from ettin_jax.training.mesh import make_mesh
            from ettin_jax.training.preflight import check_recipe_inputs

            tiny = Path(__file__).parent / "recipes" / "tiny-one-phase.yaml"
            for where in (url, url + "-typo"):
                recipe = load_recipe(tiny, [f"data.sources=[{{path: {where}, kind: mds, "
                                            f"field: input_ids}}]"])
                if where == url:
                    check_recipe_inputs(recipe, make_mesh(recipe.mesh), ByteTokenizer())
                else:
                    with pytest.raises(ConfigError, match="data.sources.0: MDS source .*typo"):
                        check_recipe_inputs(recipe, make_mesh(recipe.mesh), ByteTokenizer())
        finally:
            restore_environment(before)


def test_only_the_last_opened_shards_stay_open(tmp_path, monkeypatch):
    """Each open shard holds a file descriptor; a column keeps at most MAX_OPEN_SHARDS of them,
    and documents of closed shards still read back right."""
    import data_pipelines.mds as mds

    monkeypatch.setattr(mds, "MAX_OPEN_SHARDS", 2)
    rng = np.random.default_rng()
    texts = _texts(rng, 40)
    _write(tmp_path / "mds", texts, rng, size_limit=1024)
    column = mds.open_column(SourceConfig(str(tmp_path / "mds"), field="input_ids"),
                             ByteTokenizer())
    assert len(column.index.shards) > 4
    for i in list(rng.permutation(len(texts))) * 2:
        np.testing.assert_array_equal(column[int(i)], ByteTokenizer().encode(texts[i]))
        assert len(column._open) <= 2


def test_data_prepare_keeps_ettin_token_ids(tmp_path, tokenizer_dir, rng):
    """`data prepare` of an MDS token column writes Ettin's ids, less the brackets, into shards
    (one unit per MDS shard; tests/test_beam_prepare.py runs them through Beam)."""
    from data_pipelines.prepare import open_prepared, prepare
    from data_pipelines.sources import source_units
    from data_pipelines.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    specials = tokenizer.special_tokens
    texts = _texts(rng, 40)
    with MDSWriter(out=str(tmp_path / "mds"), columns={"input_ids": "ndarray:uint32", "id": "str"},
                   compression="zstd", size_limit=1024) as writer:
        for number, text in enumerate(texts):
            ids = [specials.cls, *tokenizer.encode(text).tolist(), specials.sep]
            writer.write({"input_ids": np.asarray(ids, np.uint32), "id": f"doc-{number}"})
    source = SourceConfig(str(tmp_path / "mds"), field="input_ids")
    assert len(source_units(source)) > 2
    manifest = prepare([source], tokenizer, tmp_path / "prepared", documents_per_shard=16,
                       workers=1, progress=False)
    assert manifest["documents"] == 40 and manifest["text_bytes"] == 0
    dataset, _ = open_prepared(tmp_path / "prepared", tokenizer)
    assert [d.tolist() for d in dataset] == [tokenizer.encode(t).tolist() for t in texts]
