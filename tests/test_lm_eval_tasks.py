"""The bundled lm-eval tasks (ettin_jax/lm_eval_tasks): built offline and deterministically from
the corpus's held-out plays, checked against the plays' own text; found by `ettin-jax lm-eval`
from any directory and by the Python API; run end to end with the ettin-jax model on a tiny
random pair, the results read back by `ettin-jax compare`."""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from conftest import randomized_model, small_config  # noqa: E402

from data_pipelines.corpus import HELDOUT_TEXT, bundled_documents  # noqa: E402
from data_pipelines.tokenizers import load_tokenizer  # noqa: E402
from ettin_jax.lm_eval_results import output_dir, read_member_results  # noqa: E402
from ettin_jax.lm_eval_tasks import TASKS_DIR, bundled  # noqa: E402
from ettin_jax.lm_harness import task_manager, with_bundled_tasks  # noqa: E402
from ettin_jax.training.checkpoint import save_weights  # noqa: E402

LIMIT = 6


def _rebuilt(builder):
    """The examples built afresh (the module caches them)."""
    bundled._next_line_examples.cache_clear()
    bundled._perplexity_examples.cache_clear()
    return builder()


def _play_lines(name: str) -> list[str]:
    (text,) = [d.text for d in bundled_documents("heldout") if d.name == name]
    return [line.strip() for line in text.splitlines()]


def test_next_line_examples_are_deterministic_and_held_out():
    examples = bundled.next_line_examples()
    assert examples == _rebuilt(bundled.next_line_examples)
    assert len(examples) == 2 * bundled.NEXT_LINE_EXAMPLES_PER_PLAY
    train_names = {d.name for d in bundled_documents("train")}
    labels = [e["label"] for e in examples]
    assert all(0 <= label < bundled.CHOICES for label in labels)
    assert {labels.count(k) for k in range(bundled.CHOICES)} == {len(examples) // 4}
    lines = {}
    for example in examples:
        name, number = example["where"].rsplit(" line ", 1)
        assert name.split("/")[1] in HELDOUT_TEXT and name not in train_names
        play = lines.setdefault(name, _play_lines(name))
        choices, answer = example["choices"], example["choices"][example["label"]]
        context = example["context"].split("\n")
        # The answer is the file's line N, right after the context's lines.
        number = int(number)
        assert play[number - 1] == answer
        assert play[number - 1 - len(context):number - 1] == context
        assert len(context) == bundled.CONTEXT_LINES and len(set(choices)) == len(choices) == 4
        for distractor in choices:
            assert distractor in play and distractor not in context
            assert len(distractor) >= bundled.MIN_LINE_CHARS
    assert len({e["where"] for e in examples}) == len(examples)


def test_perplexity_examples_are_deterministic_held_out_passages():
    examples = bundled.perplexity_examples()
    assert examples == _rebuilt(bundled.perplexity_examples)
    assert len(examples) == 2 * bundled.PERPLEXITY_PASSAGES_PER_PLAY
    for example in examples:
        name, number = example["where"].rsplit(" line ", 1)
        assert name.split("/")[1] in HELDOUT_TEXT
        first = example["text"].split("\n")[0]
        assert _play_lines(name)[int(number) - 1] == first
        assert 100 <= len(example["text"]) <= 200


def test_python_api_finds_the_tasks(tmp_path):
    manager = task_manager(include_defaults=False)
    assert {"bundled_next_line", "bundled_perplexity", "bundled_corpus"} <= set(
        manager.all_tasks)
    loaded = manager.load(["bundled_next_line"])["tasks"]["bundled_next_line"]
    docs = list(loaded.test_docs())
    assert docs == bundled.next_line_examples()
    assert loaded.doc_to_target(docs[0]) == docs[0]["label"]
    assert with_bundled_tasks(None) == [TASKS_DIR]
    assert with_bundled_tasks("mine") == [TASKS_DIR, "mine"]
    assert with_bundled_tasks(["a", str(TASKS_DIR), "b"]) == [TASKS_DIR, "a", "b"]
    # A user's task of the same name wins.
    (tmp_path / "mine.yaml").write_text(
        (TASKS_DIR / "bundled_next_line.yaml").read_text().replace(
            "!function bundled.next_line_dataset", "!function mine.dataset"))
    (tmp_path / "mine.py").write_text(
        "import datasets\n\n\ndef dataset(**_):\n    return datasets.DatasetDict({'test': "
        "datasets.Dataset.from_list([{'context': 'a', 'choices': ['b', 'c'], 'label': 1}])})\n")
    mine = task_manager(tmp_path, include_defaults=False).load(["bundled_next_line"])
    assert len(mine["tasks"]["bundled_next_line"].test_docs()) == 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dir):
    """A run directory holding a tiny random encoder and decoder."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = small_config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                          num_heads=4, num_layers=3, local_attention=8, init_std=0.2)
    root = tmp_path_factory.mktemp("lm_eval_run")
    for seed, (member, objective) in enumerate((("encoder", "mlm"), ("decoder", "clm"))):
        model = randomized_model(config, objective, seed=seed + int.from_bytes(os.urandom(2)))
        save_weights(root / member, model, special_tokens=tokenizer.special_tokens,
                     tokenizer_dir=tokenizer_dir)
    return root


@pytest.mark.parametrize("member", ["encoder", "decoder"])
def test_ettin_jax_lm_eval_runs_the_bundled_tasks(run_dir, member, tmp_path, monkeypatch):
    import lm_eval.tasks

    from ettin_jax.cli import main
    from ettin_jax.report import compare_runs

    # lm-eval's own 200+ task folders are not needed (indexing them takes seconds).
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(
        lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.chdir(tmp_path)  # found without --include_path, from any directory
    out = output_dir(run_dir, member)
    code = main(["lm-eval", "--model", "ettin-jax", "--model_args",
                 f"path={run_dir},member={member},max_length=64", "--batch_size", "16",
                 "--tasks", "bundled_corpus", "--limit", str(LIMIT), "--log_samples",
                 "--output_path", str(out)])
    assert code == 0
    results = read_member_results(run_dir, member)
    (written,) = out.glob("*/results_*.json")
    assert results.path == written
    raw = json.loads(written.read_text())["results"]
    assert set(results.tasks) == {"bundled_next_line", "bundled_perplexity"}
    assert results.tasks["bundled_next_line"]["acc"].value == raw["bundled_next_line"]["acc,none"]
    examples = bundled.next_line_examples()[:LIMIT]
    (samples_file,) = out.glob("*/samples_bundled_next_line_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == examples
    correct = []
    for sample, example in zip(samples, examples):
        # The request: the context, then each choice on the next line.
        requests = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert requests == [(example["context"], "\n" + c) for c in example["choices"]]
        scores = [float(resp[0][0]) for resp in sample["resps"]]
        correct.append(max(range(4), key=scores.__getitem__) == example["label"])
    assert results.tasks["bundled_next_line"]["acc"].value == pytest.approx(
        sum(correct) / LIMIT)
    assert results.headline("bundled_perplexity") == "bits_per_byte"
    assert results.tasks["bundled_perplexity"]["word_perplexity"].value > 1
    text = compare_runs([run_dir], tmp_path / "report").text
    acc = results.tasks["bundled_next_line"]["acc"]
    assert f"| bundled_next_line | **acc** | {run_dir.name} |" in text
    assert f"{acc.value:.4f} ± {acc.stderr:.4f}" in text
