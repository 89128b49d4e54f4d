"""Examples of a retrieval fine-tuning task (`ettin_jax.finetune.retrieval_tasks`): training
triplets (`RetrievalExample`: a query, its positive document and hard negatives) and IR
evaluation sets (`RetrievalEvalSet`: queries, a corpus and graded relevance judgements).

Triplet files (`read_triplets`): JSONL (.jsonl/.json, one JSON object per line) or Parquet
(.parquet), with a text field for the query and the positive, and an optional negatives field:
a list of texts (possibly empty), one text (sentence-transformers' MS MARCO `triplet-hard`
files have a `negative` column), or absent/null: in-batch negatives only. Read with
`data_pipelines.task_data.iter_records`; any problem raises `TaskDataError` naming the file,
line (or row) and field.

Evaluation sets (`read_eval_set`): a directory in BEIR's layout: corpus.jsonl (`_id`, `text`,
optional `title`), queries.jsonl (`_id`, `text`) and the judgements, qrels/<split>.tsv or
qrels.tsv (tab-separated `query-id corpus-id score` with a header row).

The bundled task, "code-search" (`code_search_triplets`, `code_search_eval_set`): find a
Python standard-library function's code from its docstring, built offline from the bundled
corpus (data_pipelines/corpus, which reads the running interpreter's Lib/). The query is the
docstring's first paragraph (whitespace collapsed, at most 120 characters, cut at a word end),
the document the function's source without its docstring (decorators and blank lines dropped,
at most 450 characters, cut at a line end); methods count, functions nested in functions do
not, and functions whose query or code text occurs twice in the library are left out
(`code_functions`). Split BY MODULE: the modules whose path hashes to 0 mod 10
(`is_dev_module`; they include all the corpus's held-out code files) give the validation set,
every other module training triplets with one hard negative (the code of the next function of
the same module). Deterministic, no RNG; the counts depend on the Python version. On Python
3.11: 3676 documented functions in 311 modules, 3350 once repeated texts are left out; 2000
training triplets (capped, evenly spaced over 2948) and 355 validation queries from 27
modules, each with one relevant document among those 355 functions' code. With `make demo`'s
1024-piece tokenizer a query is at most 83 tokens (99%: 63) and a document at most 329
(median 134, 99%: 248). Difficulty on validation: chance nDCG@10 about 0.01; TF-IDF over
identifier-split words (scikit-learn, sublinear tf) reaches nDCG@10 0.60, MRR@10 0.54,
recall@10 0.79. Building it parses the whole library with `ast`: a few seconds, once per
process.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines.bundled_task import evenly_spaced
from data_pipelines.task_data import TaskDataError, file_format, iter_records

if TYPE_CHECKING:
    from ettin_jax.finetune.retrieval_tasks import RetrievalSource, RetrievalTaskSpec

TRIPLET_FORMATS = ("jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    """One training example: the `query`, its `positive` document, hard `negatives` (possibly
    none: in-batch negatives only) and `where` it came from ("train.jsonl:12", "data.parquet
    row 3"; lines and rows count from 1)."""

    query: str
    positive: str
    negatives: tuple[str, ...]
    where: str


@dataclasses.dataclass(frozen=True)
class RetrievalEvalSet:
    """An IR evaluation set: `queries` {qid: text}, `corpus` {docid: text} and `qrels`
    {qid: {docid: relevance}} (graded; > 0 is relevant, as trec_eval counts it). Every query
    of qrels is in `queries` and every judged document in `corpus` (checked on creation:
    ValueError naming the first that is not); queries without judgements are allowed and are
    not evaluated (`ettin_jax.finetune.retrieval_metrics` averages over qrels' queries)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def __post_init__(self) -> None:
        for qid, judged in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"qrels query {qid!r} is not among the {len(self.queries)} "
                                 f"queries")
            for docid in judged:
                if docid not in self.corpus:
                    raise ValueError(f"qrels of query {qid!r}: document {docid!r} is not in "
                                     f"the corpus of {len(self.corpus)} documents")

    def evaluated_queries(self) -> dict[str, str]:
        """{qid: text} of the queries that qrels judges, in qrels' order."""
        return {qid: self.queries[qid] for qid in self.qrels}


# --- triplets ----------------------------------------------------------------------------------


def read_triplets(path: str | Path, *, query_field: str = "query",
                  positive_field: str = "positive",
                  negatives_field: str | None = "negatives",
                  format: str = "auto") -> list[RetrievalExample]:
    """The training examples of a JSONL or Parquet file, in the file's order (see the module
    docstring for the fields; `negatives_field` None ignores negatives). `format`: "auto" (by
    suffix), "jsonl" or "parquet". Raises TaskDataError naming the file, line (or row) and
    field for a missing file, a malformed line, a missing or empty query or positive, a
    non-text value or a file without examples."""
    path = Path(path)
    fmt = file_format(path, format)
    if fmt not in TRIPLET_FORMATS:
        raise TaskDataError(f"{path}: triplets are read from {' or '.join(TRIPLET_FORMATS)} "
                            f"files, not {fmt}")
    examples = []
    for where, record in iter_records(path, fmt):
        query = _text(record, query_field, where)
        positive = _text(record, positive_field, where)
        negatives: tuple[str, ...] = ()
        if negatives_field is not None:
            negatives = _texts(record.get(negatives_field), negatives_field, where)
        examples.append(RetrievalExample(query, positive, negatives, where))
    if not examples:
        raise TaskDataError(f"{path}: no examples")
    return examples


def _text(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise TaskDataError(f"{where}: missing field {field!r} (fields: "
                            f"{', '.join(map(str, record))})")
    value = _decoded(record[field])
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: field {field!r} is not text: {value!r}")
    if not value.strip():
        raise TaskDataError(f"{where}: field {field!r} is empty")
    return value


def _texts(value: Any, field: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    value = _decoded(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise TaskDataError(f"{where}: field {field!r} is neither a list of texts nor a text: "
                            f"{value!r}")
    texts = []
    for index, item in enumerate(value):
        item = _decoded(item)
        if not isinstance(item, str) or not item.strip():
            raise TaskDataError(f"{where}: field {field!r} item {index} is not a non-empty "
                                f"text: {item!r}")
        texts.append(item)
    return tuple(texts)


def _decoded(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def holdout_split(examples: Sequence, test_size: int, seed: int) -> tuple[list, list]:
    """(train, test) of `examples` as Hugging Face datasets'
    `Dataset.train_test_split(test_size=test_size, seed=seed)` splits a dataset (how Ettin's
    retrieval_eval/train_st.py holds out 1000 MS MARCO triplets with seed 12): a permutation
    from `np.random.default_rng(seed)`; its first `test_size` indices are the test examples,
    the rest the train examples, both in permutation order. Raises ValueError unless
    0 < test_size < len(examples)."""
    if not 0 < test_size < len(examples):
        raise ValueError(f"test_size must be in [1, {len(examples) - 1}] for "
                         f"{len(examples)} examples, got {test_size}")
    permutation = np.random.default_rng(seed).permutation(len(examples))
    return ([examples[i] for i in permutation[test_size:]],
            [examples[i] for i in permutation[:test_size]])


def eval_set_from_triplets(examples: Sequence[RetrievalExample]) -> RetrievalEvalSet:
    """An evaluation set from held-out triplets: query "q<i>" is the i-th example's query;
    the corpus holds every distinct positive and negative text once ("d<j>", in first-seen
    order); each query's one relevant document (relevance 1) is its positive. Its negatives
    and every other example's documents are the distractors. Raises ValueError for no
    examples."""
    if not examples:
        raise ValueError("no examples to build an evaluation set from")
    docids: dict[str, str] = {}
    queries, qrels = {}, {}
    for index, example in enumerate(examples):
        for text in (example.positive, *example.negatives):
            docids.setdefault(text, f"d{len(docids)}")
        qid = f"q{index}"
        queries[qid] = example.query
        qrels[qid] = {docids[example.positive]: 1}
    return RetrievalEvalSet(queries, {docid: text for text, docid in docids.items()}, qrels)


# --- BEIR evaluation sets ----------------------------------------------------------------------


def read_eval_set(directory: str | Path, split: str = "test") -> RetrievalEvalSet:
    """The evaluation set in `directory` (BEIR's layout, see the module docstring): qrels from
    qrels/<split>.tsv, else qrels.tsv; only the queries that qrels judges are kept (as BEIR's
    loader does). A document's text is its title and text joined by a space when it has a
    title (as BEIR's sentence-transformers models encode it). Relevance scores are integers.
    Raises TaskDataError naming the file, line and field for a missing file or field, a
    duplicate id, a non-integer score, or a judged query or document that is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskDataError(f"{directory}: no such directory (an evaluation set is a directory "
                            f"with corpus.jsonl, queries.jsonl and qrels/<split>.tsv or "
                            f"qrels.tsv)")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        qrels_path = directory / "qrels.tsv"
    if not qrels_path.is_file():
        raise TaskDataError(f"{directory}: no qrels/{split}.tsv or qrels.tsv")
    qrels: dict[str, dict[str, int]] = {}
    qrel_where: dict[tuple[str, str], str] = {}
    for where, record in iter_records(qrels_path, "tsv"):
        qid = _text(record, "query-id", where)
        docid = _text(record, "corpus-id", where)
        score = _text(record, "score", where)
        try:
            value = int(score)
        except ValueError:
            raise TaskDataError(f"{where}: field 'score' is not an integer: {score!r}") from None
        if docid in qrels.setdefault(qid, {}):
            raise TaskDataError(f"{where}: query {qid!r} judges document {docid!r} twice")
        qrels[qid][docid] = value
        qrel_where[qid, docid] = where
    if not qrels:
        raise TaskDataError(f"{qrels_path}: no judgements")
    queries = _read_jsonl_texts(directory / "queries.jsonl", with_title=False)
    corpus = _read_jsonl_texts(directory / "corpus.jsonl", with_title=True)
    for (qid, docid), where in qrel_where.items():
        if qid not in queries:
            raise TaskDataError(f"{where}: query {qid!r} is not in "
                                f"{directory / 'queries.jsonl'}")
        if docid not in corpus:
            raise TaskDataError(f"{where}: document {docid!r} is not in "
                                f"{directory / 'corpus.jsonl'}")
    return RetrievalEvalSet({qid: queries[qid] for qid in qrels}, corpus, qrels)


def _read_jsonl_texts(path: Path, *, with_title: bool) -> dict[str, str]:
    texts: dict[str, str] = {}
    for where, record in iter_records(path, "jsonl"):
        if "_id" not in record:
            raise TaskDataError(f"{where}: missing field '_id' (fields: "
                                f"{', '.join(map(str, record))})")
        key = str(record["_id"])
        if key in texts:
            raise TaskDataError(f"{where}: duplicate _id {key!r}")
        if "text" not in record:
            raise TaskDataError(f"{where}: missing field 'text' (fields: "
                                f"{', '.join(map(str, record))})")
        text = _decoded(record["text"])
        title = _decoded(record.get("title")) if with_title else None
        for field, value in (("text", text), ("title", title)):
            if value is not None and not isinstance(value, str):
                raise TaskDataError(f"{where}: field {field!r} is not text: {value!r}")
        texts[key] = f"{title} {text}".strip() if title else text
    return texts


# --- sources -----------------------------------------------------------------------------------


def read_retrieval_task(spec: RetrievalTaskSpec
                        ) -> tuple[list[RetrievalExample], RetrievalEvalSet]:
    """(training examples, evaluation set) of the task `spec`: its train source's triplets;
    its eval source's set, or (eval None) the `eval_holdout` triplets `holdout_split` holds
    out of them with `holdout_seed`, ranked as `eval_set_from_triplets`; then the first
    `max_train_examples` of the training examples. Raises TaskDataError naming the task and
    what is wrong."""
    train = source_triplets(spec.train)
    if spec.eval is None:
        try:
            train, held_out = holdout_split(train, spec.eval_holdout, spec.holdout_seed)
        except ValueError as err:
            raise TaskDataError(f"task {spec.name}: {spec.train.describe()}: {err}") from None
        eval_set = eval_set_from_triplets(held_out)
    else:
        eval_set = source_eval_set(spec.eval)
    if spec.max_train_examples is not None:
        train = train[:spec.max_train_examples]
    return train, eval_set


def source_triplets(source: RetrievalSource) -> list[RetrievalExample]:
    """The training examples a task's train source names: a triplets file
    (`read_triplets` with the source's fields) or the bundled task ("code-search"). Raises
    TaskDataError as `read_triplets` does, or for a source that holds no triplets."""
    if source.kind == "triplets":
        if not source.path:
            raise TaskDataError("a triplets source needs a path (set train_path=FILE)")
        return read_triplets(source.path, query_field=source.query_field,
                             positive_field=source.positive_field,
                             negatives_field=source.negatives_field, format=source.format)
    if source.kind == "bundled":
        _check_bundled(source.name)
        return code_search_triplets()
    raise TaskDataError(f"a {source.kind} source holds no training triplets")


def source_eval_set(source: RetrievalSource) -> RetrievalEvalSet:
    """The evaluation set a task's eval source names: a BEIR directory (`read_eval_set` of
    the source's split), held-out triplets (`eval_set_from_triplets` of a triplets file) or
    the bundled task's validation set. Raises TaskDataError naming what is wrong."""
    if source.kind == "beir":
        if not source.path:
            raise TaskDataError("a beir source needs a path (set eval_path=DIR)")
        return read_eval_set(source.path, source.split)
    if source.kind == "triplets":
        return eval_set_from_triplets(source_triplets(source))
    if source.kind == "bundled":
        _check_bundled(source.name)
        return code_search_eval_set()
    raise TaskDataError(f"unknown source kind {source.kind!r}")


def _check_bundled(name: str) -> None:
    if name != CODE_SEARCH:
        raise TaskDataError(f"no bundled retrieval task {name!r}; valid: {CODE_SEARCH}")


# --- the bundled task: code search over the standard library -----------------------------------

CODE_SEARCH = "code-search"
# A module (path under Lib/) is a validation module when SHA-1 of its path is 0 mod this; the
# corpus's held-out code files (0 mod 20) are among them, so about half the validation modules
# were never pretrained on.
DEV_MODULUS = 10
MIN_QUERY_CHARS, MAX_QUERY_CHARS = 30, 120
MIN_CODE_CHARS, MAX_CODE_CHARS = 80, 450
MAX_TRAIN_TRIPLETS = 2000
MAX_DEV_QUERIES = 600
MIN_TRAIN_TRIPLETS, MIN_DEV_QUERIES = 300, 150


@dataclasses.dataclass(frozen=True)
class CodeFunction:
    """A documented standard-library function or method: `module` (its path under Lib/,
    "json/decoder.py"), `line` (of its `def`), `name` (qualified: "JSONDecoder.decode"), the
    `query` (its docstring's first paragraph) and the `code` (its source without the
    docstring), both cut to their budgets."""

    module: str
    line: int
    name: str
    query: str
    code: str

    @property
    def key(self) -> str:
        """"python-stdlib/<module>:<line>": unique over the corpus."""
        return f"python-stdlib/{self.module}:{self.line}"


def code_search_triplets() -> list[RetrievalExample]:
    """The bundled task's training examples: (docstring, code, one hard negative: the code of
    the next function of the same module in source order, wrapping around) for the functions
    of the training modules (see `code_functions`) whose query and code occur once in the
    library, in modules with two or more of them; at most `MAX_TRAIN_TRIPLETS`, evenly spaced
    over all of them in (module, line) order; `where` is "python-stdlib/<module>:<line>
    <name>". Deterministic for a given Python; raises ValueError when the running Python's
    standard library yields fewer than `MIN_TRAIN_TRIPLETS`."""
    return list(_code_search()[0])


def code_search_eval_set() -> RetrievalEvalSet:
    """The bundled task's validation set: every function of the validation modules whose
    query and code occur once in the library (at most `MAX_DEV_QUERIES`, evenly spaced)
    asks with its docstring ("query:<key>") for its own code ("<key>", relevance 1) among
    the code of all of them. Deterministic for a given Python; raises ValueError when there
    are fewer than `MIN_DEV_QUERIES`."""
    return _code_search()[1]


@lru_cache(maxsize=1)
def _code_search() -> tuple[tuple[RetrievalExample, ...], RetrievalEvalSet]:
    functions = code_functions()
    # A query or code text that occurs twice is ambiguous as a query and a leak across
    # splits (the standard library repeats small helpers): such functions are left out.
    query_counts: dict[str, int] = {}
    code_counts: dict[str, int] = {}
    for function in functions:
        query_counts[function.query] = query_counts.get(function.query, 0) + 1
        code_counts[function.code] = code_counts.get(function.code, 0) + 1
    usable = [f for f in functions if query_counts[f.query] == 1 and code_counts[f.code] == 1]
    by_module: dict[str, list[CodeFunction]] = {}
    for function in usable:
        by_module.setdefault(function.module, []).append(function)
    train, dev = [], []
    for module in sorted(by_module):
        members = by_module[module]
        if is_dev_module(module):
            dev.extend(members)
        elif len(members) >= 2:
            train.extend((f, members[(i + 1) % len(members)]) for i, f in enumerate(members))
    if len(train) < MIN_TRAIN_TRIPLETS or len(dev) < MIN_DEV_QUERIES:
        raise ValueError(f"the standard library of this Python yields {len(train)} training "
                         f"triplets and {len(dev)} validation queries for {CODE_SEARCH}; at "
                         f"least {MIN_TRAIN_TRIPLETS} and {MIN_DEV_QUERIES} are needed")
    triplets = tuple(
        RetrievalExample(f.query, f.code, (negative.code,), f"{f.key} {f.name}")
        for f, negative in (train[i] for i in evenly_spaced(len(train), MAX_TRAIN_TRIPLETS)))
    chosen = [dev[i] for i in evenly_spaced(len(dev), MAX_DEV_QUERIES)]
    eval_set = RetrievalEvalSet(
        queries={f"query:{f.key}": f.query for f in chosen},
        corpus={f.key: f.code for f in chosen},
        qrels={f"query:{f.key}": {f.key: 1} for f in chosen})
    return triplets, eval_set


def is_dev_module(module: str) -> bool:
    """Whether the standard-library module at `module` (path under Lib/) is a validation
    module of the bundled code-search task (SHA-1 of the path, 0 mod `DEV_MODULUS`)."""
    return int(hashlib.sha1(module.encode()).hexdigest(), 16) % DEV_MODULUS == 0


@lru_cache(maxsize=1)
def code_functions() -> tuple[CodeFunction, ...]:
    """Every documented function and method of the bundled corpus's standard-library
    code (both of its splits), ordered by module and line.

    Kept when parsed by the running Python's `ast`; a docstring whose first paragraph
    (whitespace collapsed) has at least `MIN_QUERY_CHARS` characters, four words and is not
    on the `def` line; code of at least `MIN_CODE_CHARS` characters once the docstring is
    removed. The query is the first paragraph cut at a word end to `MAX_QUERY_CHARS`; the
    code is the function's source (from its `def`, decorators dropped), dedented, without
    the docstring's lines or blank lines, cut at a line end to `MAX_CODE_CHARS` (a first
    line longer than that is cut mid-line). Counts depend on the Python version (the
    library it reads): on Python 3.11, 3676 functions from 311 of the 556 modules."""
    from data_pipelines.corpus import bundled_documents

    functions = []
    documents = (*bundled_documents("train"), *bundled_documents("heldout"))
    for document in sorted((d for d in documents if d.kind == "code"), key=lambda d: d.name):
        functions.extend(_module_functions(document.name.split("/", 1)[1], document.text))
    return tuple(functions)


def _module_functions(module: str, source: str) -> list[CodeFunction]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes in old code warn on some Pythons
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    lines = source.splitlines()
    found = []
    for node, qualname in _functions(tree, ""):
        docstring = ast.get_docstring(node)
        first = node.body[0]
        if not docstring or first.lineno == node.lineno:
            continue
        query = " ".join(docstring.strip().split("\n\n", 1)[0].split())
        if len(query) < MIN_QUERY_CHARS or len(query.split()) < 4:
            continue
        kept = [line for number, line in enumerate(lines[node.lineno - 1:node.end_lineno],
                                                   start=node.lineno)
                if not first.lineno <= number <= first.end_lineno and line.strip()]
        code = textwrap.dedent("\n".join(line.rstrip() for line in kept))
        if len(code) < MIN_CODE_CHARS:
            continue
        found.append(CodeFunction(module, node.lineno, qualname, _cut_words(query),
                                  _cut_lines(code)))
    return sorted(found, key=lambda f: f.line)


def _functions(node: ast.AST, prefix: str):
    """(function node, qualified name) of every function and method below `node` in source
    order, not those inside functions (their code is part of the enclosing function's)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, prefix + child.name
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def _cut_words(text: str) -> str:
    return _cut(text, MAX_QUERY_CHARS, " ")


def _cut_lines(code: str) -> str:
    return _cut(code, MAX_CODE_CHARS, "\n")


def _cut(text: str, budget: int, separator: str) -> str:
    """`text` cut to at most `budget` characters, before a `separator` when one is in reach
    (else mid-word), with no trailing whitespace."""
    if len(text) <= budget:
        return text
    end = text.rfind(separator, 0, budget + 1)
    return (text[:end] if end > 0 else text[:budget]).rstrip()
