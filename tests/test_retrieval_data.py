"""data_pipelines.retrieval_data (triplet files, BEIR evaluation sets, the bundled code-search
task) and ettin_jax.finetune.retrieval_tasks (specs, presets, overrides, task files)."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pytest

from data_pipelines import retrieval_data as rd
from data_pipelines.retrieval_data import (
    RetrievalEvalSet, RetrievalExample, eval_set_from_triplets, holdout_split, read_eval_set,
    read_retrieval_task, read_triplets,
)
from data_pipelines.task_data import TaskDataError
from ettin_jax.finetune.retrieval_tasks import (
    BUNDLED_CODE_SEARCH, MSMARCO, RETRIEVAL_PRESETS, RetrievalSource, RetrievalTaskSpec,
    apply_retrieval_overrides, resolve_retrieval_task,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- triplets ----------------------------------------------------------------------------------


def test_read_triplets_jsonl_negative_forms(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"query": "q1", "positive": "p1", "negatives": ["n1", "n2"]},
        {"query": "q2", "positive": "p2", "negatives": []},
        {"query": "q3", "positive": "p3"},
        {"query": "q4", "positive": "p4", "negatives": None},
        {"query": "q5", "positive": "p5", "negatives": "only one", "extra": 3},
    ])
    path.write_text(path.read_text() + "\n")  # a blank line is skipped
    examples = read_triplets(path)
    assert [e.negatives for e in examples] == [("n1", "n2"), (), (), (), ("only one",)]
    assert examples[0] == RetrievalExample("q1", "p1", ("n1", "n2"), f"{path}:1")
    assert examples[4].where == f"{path}:5"
    ignored = read_triplets(path, negatives_field=None)
    assert all(e.negatives == () for e in ignored)


def test_read_triplets_parquet_and_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"anchor": ["a", "b"], "pos": ["x", "y"], "neg": [["n"], []]})
    pq.write_table(table, tmp_path / "t.parquet")
    examples = read_triplets(tmp_path / "t.parquet", query_field="anchor",
                             positive_field="pos", negatives_field="neg")
    assert [(e.query, e.positive, e.negatives) for e in examples] == \
        [("a", "x", ("n",)), ("b", "y", ())]
    assert examples[1].where == f"{tmp_path / 't.parquet'} row 2"
    # MS MARCO's triplet-hard layout: one negative per row, as text.
    pq.write_table(pa.table({"query": ["q"], "positive": ["p"], "negative": ["n"]}),
                   tmp_path / "m.parquet")
    assert read_triplets(tmp_path / "m.parquet", negatives_field="negative")[0].negatives == \
        ("n",)


@pytest.mark.parametrize("record, message", [
    ({"positive": "p"}, r"t.jsonl:2: missing field 'query' \(fields: positive\)"),
    ({"query": "q", "positive": 3}, r"t.jsonl:2: field 'positive' is not text: 3"),
    ({"query": "  ", "positive": "p"}, r"t.jsonl:2: field 'query' is empty"),
    ({"query": "q", "positive": "p", "negatives": ["n", 5]},
     r"t.jsonl:2: field 'negatives' item 1 is not a non-empty text: 5"),
    ({"query": "q", "positive": "p", "negatives": {"a": 1}},
     r"t.jsonl:2: field 'negatives' is neither a list of texts nor a text"),
])
def test_read_triplets_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "ok", "positive": "ok"}, record])
    with pytest.raises(TaskDataError, match=message):
        read_triplets(path)


def test_read_triplets_file_errors(tmp_path):
    with pytest.raises(TaskDataError, match="no such file"):
        read_triplets(tmp_path / "missing.jsonl")
    (tmp_path / "t.tsv").write_text("query\tpositive\nq\tp\n")
    with pytest.raises(TaskDataError, match="not tsv"):
        read_triplets(tmp_path / "t.tsv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="empty.jsonl: no examples"):
        read_triplets(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": \n')
    with pytest.raises(TaskDataError, match="bad.jsonl:2: malformed JSON line"):
        read_triplets(tmp_path / "bad.jsonl")


def test_holdout_split_matches_datasets_train_test_split(rng):
    datasets = pytest.importorskip("datasets")
    n, test_size = int(rng.integers(20, 200)), int(rng.integers(1, 19))
    seed = int(rng.integers(1_000_000))
    dataset = datasets.Dataset.from_dict({"i": list(range(n))})
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    train, test = holdout_split(list(range(n)), test_size, seed)
    assert train == split["train"]["i"] and test == split["test"]["i"]
    with pytest.raises(ValueError, match="test_size"):
        holdout_split([1, 2], 2, 0)


def test_eval_set_from_triplets():
    examples = [RetrievalExample("a", "pa", ("n", "pb"), "1"),
                RetrievalExample("b", "pb", (), "2"),
                RetrievalExample("a", "pc", ("n",), "3")]
    evals = eval_set_from_triplets(examples)
    assert evals.queries == {"q0": "a", "q1": "b", "q2": "a"}
    assert evals.corpus == {"d0": "pa", "d1": "n", "d2": "pb", "d3": "pc"}
    assert evals.qrels == {"q0": {"d0": 1}, "q1": {"d2": 1}, "q2": {"d3": 1}}


# --- BEIR evaluation sets ----------------------------------------------------------------------


def write_beir(directory, qrels_lines, *, nested=True):
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "corpus.jsonl", [
        {"_id": "d1", "title": "Title", "text": "body one"},
        {"_id": "d2", "title": "", "text": "body two"},
        {"_id": 3, "text": "body three"},
    ])
    write_jsonl(directory / "queries.jsonl", [
        {"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"},
        {"_id": "q3", "text": "not judged"},
    ])
    qrels = directory / "qrels" / "test.tsv" if nested else directory / "qrels.tsv"
    qrels.parent.mkdir(exist_ok=True)
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels_lines))
    return qrels


def test_read_eval_set_beir_layout(tmp_path):
    write_beir(tmp_path / "beir", ["q1\td1\t2", "q1\t3\t0", "q2\td2\t1"])
    evals = read_eval_set(tmp_path / "beir")
    assert evals.queries == {"q1": "first?", "q2": "second?"}
    assert evals.corpus == {"d1": "Title body one", "d2": "body two", "3": "body three"}
    assert evals.qrels == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    write_beir(tmp_path / "flat", ["q2\td1\t1"], nested=False)
    assert read_eval_set(tmp_path / "flat", "dev").qrels == {"q2": {"d1": 1}}


@pytest.mark.parametrize("lines, message", [
    (["q1\td9\t1"], r"test.tsv:2: document 'd9' is not in .*corpus.jsonl"),
    (["q9\td1\t1"], r"test.tsv:2: query 'q9' is not in .*queries.jsonl"),
    (["q1\td1\thigh"], r"test.tsv:2: field 'score' is not an integer: 'high'"),
    (["q1\td1\t1", "q1\td1\t2"], r"test.tsv:3: query 'q1' judges document 'd1' twice"),
    (["q1\td1"], r"test.tsv:2: missing field 'score'"),
])
def test_read_eval_set_errors(tmp_path, lines, message):
    write_beir(tmp_path, lines)
    with pytest.raises(TaskDataError, match=message):
        read_eval_set(tmp_path)


def test_read_eval_set_missing_parts(tmp_path):
    with pytest.raises(TaskDataError, match="no such directory"):
        read_eval_set(tmp_path / "nothing")
    with pytest.raises(TaskDataError, match="no qrels/test.tsv or qrels.tsv"):
        read_eval_set(tmp_path)
    write_beir(tmp_path, ["q1\td1\t1"])
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    with pytest.raises(TaskDataError, match=r"corpus.jsonl:2: duplicate _id 'd1'"):
        read_eval_set(tmp_path)
    with pytest.raises(ValueError, match="document 'x' is not in the corpus"):
        RetrievalEvalSet({"q": "?"}, {"d": "."}, {"q": {"x": 1}})


# --- the bundled code-search task --------------------------------------------------------------

SOURCE = textwrap.dedent('''
    import functools

    def short():
        """Return nothing at all, really nothing."""
        return None

    @functools.cache
    def documented(a, b):
        """Add two numbers and return their sum.

        Longer explanation that is not part of the query.
        """

        total = a + b  # the sum

        if total > 100:
            return total
        return total + 0


    class Box:
        def method(self, value):
            """Store a value in the box for later use."""
            self.value = value
            self.history = [*getattr(self, "history", []), value]
            return self.value

        def undocumented(self):
            return self.value * 2 + len(self.history) + 1000000 + 2000000 + 3000000

    def outer():
        """Compute something with an inner helper function."""
        def inner():
            """Inner helper that should not be a separate function."""
            return 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13 + 14 + 15
        return inner() + inner()

    def oneline(): """Docstring on the def line is skipped."""; return 1 + 2 + 3 + 4 + 5 + 6 + 7
''')


def test_module_functions_extracts_queries_and_code():
    functions = rd._module_functions("pkg/mod.py", SOURCE)
    assert [f.name for f in functions] == ["documented", "Box.method", "outer"]
    documented = functions[0]
    assert documented.query == "Add two numbers and return their sum."
    assert documented.code == textwrap.dedent('''\
        def documented(a, b):
            total = a + b  # the sum
            if total > 100:
                return total
            return total + 0''')
    assert documented.key == f"python-stdlib/pkg/mod.py:{documented.line}"
    assert SOURCE.splitlines()[documented.line - 1].startswith("def documented")
    assert functions[1].code.startswith("def method(self, value):\n    self.value = value")
    # A nested function is part of its enclosing function's code (docstring and all).
    assert functions[2].code.startswith('def outer():\n    def inner():\n        """Inner')
    assert rd._module_functions("bad.py", "def broken(:\n") == []


def test_budget_cuts():
    words = " ".join(f"word{i}" for i in range(60))
    cut = rd._cut_words(words)
    assert len(cut) <= rd.MAX_QUERY_CHARS and words.startswith(cut) and not cut.endswith(" ")
    assert words[len(cut)] == " "
    code = "\n".join(f"line_{i} = {i}" for i in range(100))
    cut = rd._cut_lines(code)
    assert len(cut) <= rd.MAX_CODE_CHARS and code.startswith(cut) and code[len(cut)] == "\n"
    assert rd._cut_lines("x" * 1000) == "x" * rd.MAX_CODE_CHARS


@pytest.fixture(scope="module")
def code_search():
    return rd.code_search_triplets(), rd.code_search_eval_set()


def test_bundled_code_search_task(code_search):
    triplets, evals = code_search
    assert rd.MIN_TRAIN_TRIPLETS <= len(triplets) <= rd.MAX_TRAIN_TRIPLETS
    assert rd.MIN_DEV_QUERIES <= len(evals.queries) <= rd.MAX_DEV_QUERIES
    train_modules = {e.where.split(":")[0].removeprefix("python-stdlib/") for e in triplets}
    dev_modules = {d.split(":")[0].removeprefix("python-stdlib/") for d in evals.corpus}
    assert not train_modules & dev_modules
    assert all(rd.is_dev_module(m) for m in dev_modules)
    assert not any(rd.is_dev_module(m) for m in train_modules)
    by_key = {f.key: f for f in rd.code_functions()}
    for example in triplets:
        key = example.where.split(" ")[0]
        function = by_key[key]
        assert (example.query, example.positive) == (function.query, function.code)
        (negative,) = example.negatives
        assert negative != example.positive
        assert any(f.code == negative and f.module == function.module for f in by_key.values())
        assert len(example.query) <= rd.MAX_QUERY_CHARS
        assert len(example.positive) <= rd.MAX_CODE_CHARS
    assert len({e.query for e in triplets}) == len(triplets)
    # Validation: one relevant document per query, its own code; texts never repeated.
    assert set(evals.qrels) == set(evals.queries)
    for qid, judged in evals.qrels.items():
        assert judged == {qid.removeprefix("query:"): 1}
    assert len(set(evals.corpus.values())) == len(evals.corpus)
    train_texts = {e.query for e in triplets} | {e.positive for e in triplets}
    assert not train_texts & (set(evals.queries.values()) | set(evals.corpus.values()))
    # Deterministic: rebuilt from the parsed functions, the same examples.
    rd._code_search.cache_clear()
    assert rd.code_search_triplets() == triplets and rd.code_search_eval_set() == evals


def test_bundled_spec_reads_code_search(code_search):
    train, evals = read_retrieval_task(BUNDLED_CODE_SEARCH)
    assert (train, evals) == (list(code_search[0]), code_search[1])


# --- retrieval task specs ----------------------------------------------------------------------


def test_presets():
    assert set(RETRIEVAL_PRESETS) == {"bundled-code-search", "msmarco"}
    bundled = RETRIEVAL_PRESETS["bundled-code-search"]
    assert (bundled.batch_size, bundled.mini_batch_size, bundled.epochs) == (64, 16, 1)
    assert bundled.headline == "ndcg@10" and bundled.top_k == 100
    assert bundled.k_values == (10, 100)
    # Ettin's retrieval_eval/train_st.py.
    assert (MSMARCO.batch_size, MSMARCO.mini_batch_size, MSMARCO.scale, MSMARCO.epochs) == \
        (1024, 256, 20.0, 1)
    assert (MSMARCO.warmup_fraction, MSMARCO.learning_rate) == (0.05, 3e-4)
    assert (MSMARCO.eval_holdout, MSMARCO.holdout_seed, MSMARCO.max_train_examples) == \
        (1000, 12, 1_250_000)
    assert (MSMARCO.pooling("mlm"), MSMARCO.pooling("clm")) == ("mean", "lasttoken")


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 100, "mini_batch_size": 16}, "multiple of mini_batch_size"),
    ({"metrics": ("hits@10",)}, "unknown retrieval metric"),
    ({"encoder_pooling": "lasttoken"}, "not supported by the encoder"),
    ({"similarity": "l2"}, "similarity must be one of"),
    ({"eval_holdout": 5}, "not both"),
    ({"eval": None}, "eval_holdout >= 1"),
    ({"scale": 0.0}, "scale must be > 0"),
    ({"train": RetrievalSource("beir", path="x")}, "not training triplets"),
])
def test_spec_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BUNDLED_CODE_SEARCH, **changes)


def test_resolve_msmarco_needs_train_path_and_reads_it(tmp_path, rng):
    with pytest.raises(ValueError, match="has no path; set train_path"):
        resolve_retrieval_task("msmarco")
    n = int(rng.integers(30, 60))
    path = write_jsonl(tmp_path / "msmarco.jsonl", [
        {"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(n)])
    spec = resolve_retrieval_task("msmarco", {
        "train_path": str(path), "eval_holdout": "10", "max_train_examples": "15",
        "batch_size": "8", "mini_batch_size": "4", "no_duplicates": "false", "seeds": "1,2"})
    assert (spec.batch_size, spec.no_duplicates, spec.seeds) == (8, False, (1, 2))
    train, evals = read_retrieval_task(spec)
    kept, held = holdout_split(read_triplets(path, negatives_field="negative"), 10, 12)
    assert train == kept[:15] and evals == eval_set_from_triplets(held)
    assert len(evals.corpus) == 20  # each held-out triplet's positive and negative


def test_overrides_and_task_files(tmp_path):
    write_beir(tmp_path / "beir", ["q1\td1\t1"])
    write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "p": "b", "n": ["c"]}])
    task = tmp_path / "mine.yaml"
    task.write_text("preset: bundled-code-search\ntrain_path: train.jsonl\neval_path: beir\n"
                    "eval_split: test\nquery_field: q\npositive_field: p\nnegatives_field: n\n"
                    "learning_rate: 1e-4\n")
    spec = resolve_retrieval_task(str(task), {"epochs": 2})
    assert spec.name == "mine" and spec.learning_rate == 1e-4 and spec.epochs == 2
    assert spec.train == RetrievalSource("triplets", path=str(tmp_path / "train.jsonl"),
                                         query_field="q", positive_field="p",
                                         negatives_field="n")
    assert spec.eval == RetrievalSource("beir", path=str(tmp_path / "beir"), split="test")
    train, evals = read_retrieval_task(spec)
    assert train == [RetrievalExample("a", "b", ("c",), f"{tmp_path / 'train.jsonl'}:1")]
    assert evals.qrels == {"q1": {"d1": 1}}
    with pytest.raises(ValueError, match="unknown retrieval task setting 'bogus'"):
        apply_retrieval_overrides(MSMARCO, {"bogus": 1})
    with pytest.raises(ValueError, match=r"task setting epochs='two'"):
        apply_retrieval_overrides(MSMARCO, {"epochs": "two"})
    with pytest.raises(ValueError, match="apply to triplets sources"):
        apply_retrieval_overrides(BUNDLED_CODE_SEARCH, {"query_field": "x"})
    with pytest.raises(ValueError, match="eval_split applies to a BEIR"):
        apply_retrieval_overrides(MSMARCO, {"eval_split": "dev"})
    with pytest.raises(ValueError, match="not a preset"):
        resolve_retrieval_task("nonsense")
    (tmp_path / "bad.yaml").write_text("preset: nope\n")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        resolve_retrieval_task(str(tmp_path / "bad.yaml"))
    assert np.isclose(apply_retrieval_overrides(MSMARCO, {"max_grad_norm": "none",
                                                          "scale": "30"}).scale, 30.0)
    assert apply_retrieval_overrides(MSMARCO, {"negatives_field": "none"}).train \
        .negatives_field is None
    assert isinstance(BUNDLED_CODE_SEARCH, RetrievalTaskSpec)
