"""Fine-tuning tasks: GLUE presets read from a real prepared TFDS copy (written by TFDS's own
GLUE builder from GLUE's TSV layouts, offline), local task files in every format, their error
messages, encoding with the members' special tokens, and the bundled genre task."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from glue_copy import sentence

from data_pipelines import bundled_task
from data_pipelines.special_tokens import PROJECT, with_special_tokens
from data_pipelines.task_data import (
    Example, TaskDataError, encode_examples, read_examples, truncate_pair,
)
from ettin_jax.finetune.tasks import (
    GLUE_TASKS, PRESETS, TaskSource, TaskSpec, resolve_task, task_from_files,
)

@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_glue_presets_read_prepared_tfds(glue_dir, task):
    data_dir, expected = glue_dir
    spec = resolve_task(task, {"data_dir": str(data_dir)})
    for split in ("train", *spec.eval_splits):
        examples = read_examples(spec, split)
        got = sorted((e.text, e.pair, e.label) for e in examples)
        want = sorted(expected[task][split])
        if spec.is_regression:
            assert [g[:2] for g in got] == [w[:2] for w in want]
            np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-6)
            assert all(isinstance(e.label, float) for e in examples)
        else:
            assert got == want
            assert all(isinstance(e.label, int) for e in examples)
        assert examples[0].where.startswith(f"tfds glue/{task} {split} record ")


def test_glue_preset_settings_follow_bert24():
    mnli, rte, mrpc, stsb = (GLUE_TASKS[t] for t in ("mnli", "rte", "mrpc", "stsb"))
    assert (mnli.dev_split, mnli.extra_dev_splits) == ("validation_matched",
                                                       ("validation_mismatched",))
    assert (mnli.epochs, mnli.batch_size, mnli.learning_rate) == (3, 48, 5e-5)
    assert (rte.epochs, rte.batch_size, rte.learning_rate, rte.weight_decay) == (3, 16, 1e-5, 1e-5)
    assert (mrpc.learning_rate, mrpc.metrics, mrpc.init_from_task) == (8e-5, ("f1", "accuracy"),
                                                                       "mnli")
    assert stsb.labels is None and stsb.num_labels == 1 and stsb.metrics[0] == "pearson"
    assert GLUE_TASKS["cola"].metrics == ("matthews",)
    for spec in GLUE_TASKS.values():
        assert spec.max_length == 256 and spec.warmup_fraction == 0.06
        assert (spec.adam_b1, spec.adam_b2, spec.adam_eps) == (0.9, 0.98, 1e-6)
        assert spec.weight_decay == pytest.approx(spec.learning_rate / 10) or spec.name == "rte"


def test_tfds_errors(glue_dir, tmp_path):
    data_dir, _ = glue_dir
    spec = resolve_task("rte", {"data_dir": str(tmp_path)})
    with pytest.raises(TaskDataError, match=r"glue/rte .*not prepared.*--file_format "
                                            r"array_record"):
        read_examples(spec, "train")
    spec = resolve_task("rte", {"data_dir": str(data_dir)})
    with pytest.raises(TaskDataError, match="no split 'dev'.*validation"):
        read_examples(spec, "dev")
    with pytest.raises(TaskDataError, match=r"record \d+: field 'label' is -1 \(unlabelled"):
        read_examples(spec, "test")
    relabelled = TaskSpec(**{**spec.__dict__, "labels": ("yes", "no")})
    with pytest.raises(TaskDataError, match="has the labels .*'entailment'.*the task says"):
        read_examples(relabelled, "train")
    renamed = TaskSpec(**{**spec.__dict__, "pair_field": "hypothesis"})
    with pytest.raises(TaskDataError, match=r"record 0: missing field 'hypothesis'"):
        read_examples(renamed, "train")


# --- local files -------------------------------------------------------------------------------


def _random_rows(rng, n, labels=("neg", "pos", "mixed")):
    return [{"sentence": sentence(rng), "other": sentence(rng),
             "label": str(rng.choice(labels))} for _ in range(n)]


def _write(path, rows, fmt):
    if fmt == "tsv":
        lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_files_in_every_format(tmp_path, rng, fmt):
    train, dev = _random_rows(rng, 9), _random_rows(rng, 4)
    if fmt == "csv":  # CSV quoting: commas, quotes and a newline inside a field
        dev[0]["sentence"] = 'he said, "stay"\nand left'
    _write(tmp_path / f"train.{fmt}", train, fmt)
    _write(tmp_path / f"dev.{fmt}", dev, fmt)
    spec = task_from_files("t", {"train": tmp_path / f"train.{fmt}",
                                 "validation": tmp_path / f"dev.{fmt}"},
                           text_field="sentence", pair_field="other")
    labels = tuple(sorted({r["label"] for r in train}))
    assert spec.labels == labels
    for split, rows in (("train", train), ("validation", dev)):
        examples = read_examples(spec, split)
        assert [(e.text, e.pair, e.label) for e in examples] == [
            (r["sentence"], r["other"], labels.index(r["label"])) for r in rows]
    where = read_examples(spec, "train")[2].where
    assert where == (f"{tmp_path}/train.{fmt} row 3" if fmt == "parquet"
                     else f"{tmp_path}/train.{fmt}:4" if fmt in ("tsv", "csv")
                     else f"{tmp_path}/train.{fmt}:3")


def test_labels_inferred_numerically_or_given_and_indices(tmp_path, rng):
    rows = [{"text": sentence(rng), "y": int(y)} for y in rng.permutation([10, 2, 1, 2, 10])]
    _write(tmp_path / "train.jsonl", rows, "jsonl")
    spec = task_from_files("n", {"train": tmp_path / "train.jsonl",
                                 "validation": tmp_path / "train.jsonl"},
                           text_field="text", label_field="y")
    assert spec.labels == ("1", "2", "10") and spec.metrics == ("accuracy",)
    assert [e.label for e in read_examples(spec, "train")] == [
        ("1", "2", "10").index(str(r["y"])) for r in rows]
    # Names given: a label is a name or (GLUE's SST-2 writes 0/1) its index.
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tnegative\n")
    spec = task_from_files("s", {"train": tmp_path / "sst.tsv", "validation": tmp_path / "sst.tsv"},
                           text_field="sentence", labels=("negative", "positive"))
    assert [e.label for e in read_examples(spec, "train")] == [1, 0]
    assert spec.metrics == ("accuracy", "f1")


def test_headerless_tsv_with_columns_keeps_quotes(tmp_path):
    # CoLA's layout: no header, quotes are text (TSV is never quoted).
    (tmp_path / "cola.tsv").write_text('gj04\t1\t\t"Quoted," she said.\ngj04\t0\t*\tHim left.\n')
    spec = task_from_files("c", {"train": tmp_path / "cola.tsv",
                                 "validation": tmp_path / "cola.tsv"},
                           text_field="sentence", labels=("unacceptable", "acceptable"),
                           columns=("source", "label", "mark", "sentence"))
    assert [(e.text, e.label) for e in read_examples(spec, "train")] == [
        ('"Quoted," she said.', 1), ("Him left.", 0)]


def test_regression_files(tmp_path, rng):
    targets = rng.uniform(0, 5, 6).round(3)
    rows = [{"a": sentence(rng), "b": sentence(rng), "score": float(t)} for t in targets]
    _write(tmp_path / "sts.parquet", rows, "parquet")
    spec = task_from_files("sts", {"train": tmp_path / "sts.parquet",
                                   "validation": tmp_path / "sts.parquet"},
                           text_field="a", pair_field="b", label_field="score", regression=True)
    assert spec.labels is None and spec.metrics == ("pearson", "spearman")
    assert [e.label for e in read_examples(spec, "validation")] == list(targets)


def _spec(tmp_path, name, text, **kwargs):
    (tmp_path / name).write_text(text)
    defaults = {"text_field": "sentence", "labels": ("neg", "pos")}
    return task_from_files("e", {"train": tmp_path / name, "validation": tmp_path / name},
                           **{**defaults, **kwargs})


@pytest.mark.parametrize("name,text,kwargs,message", [
    ("a.tsv", "sentence\tlabel\nfine\tpos\nshort\n", {},
     r"a\.tsv:3: missing field 'label' \(the row has 1 fields, the header 2\)"),
    ("a.tsv", "sentence\tlabel\nfine\tpos\nwhat\tmaybe\n", {},
     r"a\.tsv:3: field 'label': unknown label 'maybe' \(labels: neg, pos\)"),
    ("a.tsv", "sentence\tlabel\nfine\tpos\nextra\tpos\tx\n", {},
     r"a\.tsv:3: 3 fields, the header has 2"),
    ("a.csv", "text,label\nfine,pos\n", {},
     r"a\.csv:2: missing field 'sentence' \(fields: text, label\)"),
    ("a.csv", "sentence,label\nfine,\n", {}, r"a\.csv:2: field 'label' is empty"),
    ("a.jsonl", '{"sentence": "x", "label": "pos"}\n\n{"sentence": "y"}\n', {},
     r"a\.jsonl:3: missing field 'label'"),
    ("a.jsonl", '{"sentence": "x", "label": "pos"}\n{"sentence": 3, "label": "pos"}\n', {},
     r"a\.jsonl:2: field 'sentence' is not text"),
    ("a.jsonl", '{"sentence": "x", "label": "pos"}\n{"sentence": "y", "lab\n', {},
     r"a\.jsonl:2: malformed JSON line"),
    ("a.jsonl", '{"sentence": "x", "label": "pos"}\n{"sentence": "y", "label": "3"}\n', {},
     r"a\.jsonl:2: field 'label': unknown label '3'"),
    ("s.tsv", "sentence\tscore\nx\t4.2\ny\thigh\n", {"labels": None, "regression": True,
                                                     "label_field": "score"},
     r"s\.tsv:3: field 'score': regression label 'high' is not a finite number"),
    ("s.tsv", "sentence\tscore\nx\tnan\n", {"labels": None, "regression": True,
                                            "label_field": "score"},
     r"s\.tsv:2: field 'score': regression label 'nan' is not a finite number"),
    ("e.tsv", "sentence\tlabel\n", {}, r"task 'e': split 'train' \(.*e\.tsv\) holds no examples"),
    ("a.txt", "x\n", {}, r"a\.txt: cannot tell the format from the suffix '\.txt'"),
])
def test_file_errors_name_file_line_and_field(tmp_path, name, text, kwargs, message):
    spec = _spec(tmp_path, name, text, **kwargs)
    with pytest.raises(TaskDataError, match=message):
        read_examples(spec, "train")


def test_parquet_errors_name_row_and_field(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"sentence": "a", "label": "pos"},
                                         {"sentence": None, "label": "neg"}]),
                   tmp_path / "p.parquet")
    spec = task_from_files("p", {"train": tmp_path / "p.parquet",
                                 "validation": tmp_path / "p.parquet"},
                           text_field="sentence", labels=("neg", "pos"))
    with pytest.raises(TaskDataError, match=r"p\.parquet row 2: field 'sentence' is not text"):
        read_examples(spec, "train")
    spec = TaskSpec(**{**spec.__dict__, "pair_field": "hypothesis"})
    with pytest.raises(TaskDataError, match=r"p\.parquet row 1: missing field 'hypothesis'"):
        read_examples(spec, "train")


def test_task_errors(tmp_path):
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nx\tpos\n")
    with pytest.raises(ValueError, match=r"2 or more distinct names, got \('pos',\)"):
        task_from_files("t", {"train": tmp_path / "t.tsv", "validation": tmp_path / "t.tsv"},
                        text_field="sentence")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nx\tpos\ny\tneg\n")
    spec = task_from_files("t", {"train": tmp_path / "t.tsv", "validation": tmp_path / "t.tsv"},
                           text_field="sentence")
    with pytest.raises(TaskDataError, match="no file for split 'test' .*train, validation"):
        read_examples(spec, "test")
    with pytest.raises(ValueError, match="no file for split 'validation'"):
        task_from_files("t", {"train": tmp_path / "t.tsv"}, text_field="sentence",
                        labels=("a", "b"))
    with pytest.raises(TaskDataError, match=r"nowhere\.tsv: no such file"):
        task_from_files("t", {"train": tmp_path / "nowhere.tsv"}, text_field="sentence")
    with pytest.raises(ValueError, match="metric 'pearson' does not apply to classes"):
        TaskSpec("x", TaskSource("bundled", "genre"), "text", labels=("a", "b"),
                 metrics=("pearson",))
    with pytest.raises(ValueError, match="'f1' needs exactly 2 labels"):
        TaskSpec("x", TaskSource("bundled", "genre"), "text", labels=("a", "b", "c"),
                 metrics=("f1",))


# --- resolve_task ------------------------------------------------------------------------------


def test_resolve_presets_overrides_and_task_files(tmp_path):
    assert set(PRESETS) == {*GLUE_TASKS, "bundled-genre"}
    spec = resolve_task("mrpc", {"data_dir": "/data/tfds", "epochs": "4", "learning_rate": "1e-5",
                                 "seeds": "1,2", "init_from_task": "none"})
    assert (spec.source.data_dir, spec.epochs, spec.learning_rate, spec.seeds,
            spec.init_from_task) == ("/data/tfds", 4, 1e-5, (1, 2), None)
    with pytest.raises(ValueError, match="unknown task setting 'epoch'.*epochs"):
        resolve_task("mrpc", {"epoch": 3})
    with pytest.raises(ValueError, match=r"task setting batch_size='many'"):
        resolve_task("mrpc", {"batch_size": "many"})
    with pytest.raises(ValueError, match="unknown task 'mrcp'.*mrpc"):
        resolve_task("mrcp")

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"review": "fine", "stars": 5}\n'
                                                   '{"review": "poor", "stars": 1}\n')
    (tmp_path / "task.yaml").write_text(
        "source: {files: {train: data/train.jsonl, validation: data/train.jsonl}}\n"
        "text_field: review\nlabel_field: stars\nepochs: 5\nmetrics: [accuracy, matthews]\n")
    spec = resolve_task(str(tmp_path / "task.yaml"), {"batch_size": 8})
    assert (spec.name, spec.labels, spec.epochs, spec.batch_size, spec.metrics) == (
        "task", ("1", "5"), 5, 8, ("accuracy", "matthews"))
    assert [e.label for e in read_examples(spec, "validation")] == [1, 0]

    (tmp_path / "glue.json").write_text(json.dumps(
        {"preset": "rte", "source": {"tfds": "glue/rte", "data_dir": "tfds"}, "epochs": 1}))
    spec = resolve_task(str(tmp_path / "glue.json"))
    assert (spec.name, spec.source.data_dir, spec.epochs, spec.learning_rate) == (
        "rte", str(tmp_path / "tfds"), 1, 1e-5)
    (tmp_path / "bad.yaml").write_text("preset: rte\nsource: {tfds: glue/rte, path: x}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: source: unknown key 'path'"):
        resolve_task(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match=r"task file .*missing\.yaml does not exist"):
        resolve_task(str(tmp_path / "missing.yaml"))


# --- encoding ----------------------------------------------------------------------------------


class WordTokenizer:
    """Whitespace words -> ids from a fixed table (10.. upward), PROJECT's special tokens."""

    special_tokens = PROJECT

    def __init__(self):
        self.table: dict[str, int] = {}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([self.table.setdefault(w, 10 + len(self.table)) for w in text.split()],
                          np.int32)


def _longest_first(first: list, second: list, budget: int) -> tuple[list, list]:
    """transformers' slow `truncate_sequences(..., "longest_first")`, token by token."""
    first, second = list(first), list(second)
    for _ in range(max(0, len(first) + len(second) - budget)):
        if len(first) > len(second):
            first.pop()
        else:
            second.pop()
    return first, second


def test_truncate_pair_is_longest_first():
    for budget in range(1, 14):
        for n1 in range(15):
            for n2 in range(15):
                a, b = _longest_first(range(n1), range(n2), budget)
                if n1 + n2 >= budget or (a, b) == (list(range(n1)), list(range(n2))):
                    assert truncate_pair(n1, n2, budget) == (len(a), len(b)), (n1, n2, budget)
        assert truncate_pair(20, None, budget) == (budget, None)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_encode_examples_exact_ids(rng, objective):
    tokenizer = WordTokenizer()
    max_length = 16
    examples = []
    for i in range(30):
        pair = sentence(rng, 0, 14) if i % 3 else None
        examples.append(Example(sentence(rng, 0, 20), pair, int(rng.integers(0, 3)), f"x:{i}"))
    encoded = encode_examples(examples, tokenizer, objective=objective, max_length=max_length)
    assert encoded["input_ids"].shape == encoded["attention_mask"].shape == (30, max_length)
    assert encoded["input_ids"].dtype == encoded["attention_mask"].dtype == np.int32
    assert encoded["labels"].dtype == np.int32
    np.testing.assert_array_equal(encoded["labels"], [e.label for e in examples])
    truncated = 0
    for row, example in enumerate(examples):
        first = tokenizer.encode(example.text).tolist()
        if example.pair is None:
            specials = 2 if objective == "mlm" else 1
            kept_first, kept_second = first[:max_length - specials], None
        else:
            specials = 3 if objective == "mlm" else 2
            kept_first, kept_second = _longest_first(first, tokenizer.encode(example.pair),
                                                     max_length - specials)
        truncated += len(kept_first) < len(first)
        ids = with_special_tokens(kept_first, kept_second, PROJECT, objective=objective)
        want = np.full(max_length, PROJECT.pad, np.int32)
        want[:ids.size] = ids
        np.testing.assert_array_equal(encoded["input_ids"][row], want)
        np.testing.assert_array_equal(encoded["attention_mask"][row],
                                      np.arange(max_length) < ids.size)
        assert encoded["input_ids"][row, 0] == PROJECT.cls
        if objective == "mlm":  # the closing [SEP] survives truncation
            assert encoded["input_ids"][row, ids.size - 1] == PROJECT.sep
    assert truncated > 0  # the test covered truncation
    again = encode_examples(examples, tokenizer, objective=objective, max_length=max_length)
    for key in encoded:
        np.testing.assert_array_equal(encoded[key], again[key])


def test_encode_regression_labels_and_errors():
    tokenizer = WordTokenizer()
    encoded = encode_examples([Example("a b", "c", 2.5, "x"), Example("d", "e f", 0.25, "y")],
                              tokenizer, objective="mlm", max_length=8)
    assert encoded["labels"].dtype == np.float32
    np.testing.assert_array_equal(encoded["labels"], [2.5, 0.25])
    with pytest.raises(ValueError, match="mix class indices and regression"):
        encode_examples([Example("a", None, 1, "x"), Example("b", None, 0.5, "y")], tokenizer,
                        objective="mlm", max_length=8)
    with pytest.raises(ValueError, match="max_length 3 leaves no room"):
        encode_examples([Example("a", "b", 1, "x")], tokenizer, objective="mlm", max_length=3)


# --- the bundled genre task --------------------------------------------------------------------


def test_bundled_genre_task(tokenizer_dir):
    from data_pipelines.tokenizers import load_tokenizer

    spec = resolve_task("bundled-genre")
    train, dev = read_examples(spec, "train"), read_examples(spec, "validation")
    assert (len(train), len(dev)) == (1800, 540)
    for examples in (train, dev):
        counts = np.bincount([e.label for e in examples], minlength=3)
        assert counts.max() / counts.sum() == pytest.approx(1 / 3)  # the majority-class rate
        assert all(bundled_task.MIN_CHARS <= len(e.text) <= bundled_task.MAX_CHARS
                   for e in examples)
    plays = {split: {e.where.split(" ")[0] for e in examples}
             for split, examples in (("train", train), ("dev", dev))}
    assert plays["train"].isdisjoint(plays["dev"])  # split by document
    assert (len(plays["train"]), len(plays["dev"])) == (25, 9)
    assert {"shakespeare/macbeth_gut.txt", "shakespeare/twelfth_night_gut.txt"} <= plays["dev"]
    for play in plays["train"] | plays["dev"]:
        genre = bundled_task.PLAYS[play.removeprefix("shakespeare/").removesuffix("_gut.txt")]
        assert {e.label for e in train + dev if e.where.startswith(play + " ")} == {
            bundled_task.GENRES.index(genre)}
    # No stage directions or speaker lines, no passage twice.
    assert not any(line.startswith("[") for e in train for line in e.text.splitlines())
    assert len({e.text for e in train + dev}) == len(train) + len(dev)
    # Deterministic: rebuilt from the archive, the same examples.
    bundled_task._examples.cache_clear()
    assert read_examples(spec, "train") == train
    # Fits max_length 128 with a small tokenizer (512 pieces, four plays): all but a few.
    tokenizer = load_tokenizer(tokenizer_dir)
    encoded = encode_examples(dev, tokenizer, objective="mlm", max_length=spec.max_length)
    fits = encoded["attention_mask"][:, -1] == 0
    assert fits.mean() > 0.99
    with pytest.raises(TaskDataError, match="bundled-genre has no split 'test'"):
        read_examples(spec, "test")
