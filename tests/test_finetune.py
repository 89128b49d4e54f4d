"""`ettin-jax finetune`: both members of a pair fine-tuned on a task over a seed sweep, their
exports scored by transformers and scikit-learn, resumption after a crash, GLUE presets from a
prepared TFDS copy, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib

import jax
import numpy as np
import pytest
from conftest import small_config
from glue_copy import sentence

from data_pipelines.tokenizers import load_tokenizer
from ettin_jax.cli import main
from ettin_jax.errors import CheckpointError
from ettin_jax.finetune import classification, loop
from ettin_jax.finetune.config import finetune_settings
from ettin_jax.finetune.results import read_summary
from ettin_jax.inference import load_model
from ettin_jax.models import EttinModel
from ettin_jax.training.checkpoint import save_weights
from ettin_jax.training.mesh import make_mesh
from ettin_jax.training.metrics import read_metrics

# Small and quick: 2 layers, 8 rows per step, 32 tokens per example, 2 epochs.
SETTINGS = ["epochs=2", "batch_size=8", "max_length=32", "eval_batch_size=16",
            "logging_every_steps=1", "learning_rate=1e-3"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    """A run directory with a random tiny encoder and decoder (2 layers) and the tokenizer."""
    from flax import nnx

    run = tmp_path_factory.mktemp("pair")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = small_config(num_layers=2, vocab_size=512)
    for member, objective in (("encoder", "mlm"), ("decoder", "clm")):
        model = EttinModel(config, objective, rngs=nnx.Rngs(zlib.crc32(member.encode())))
        save_weights(run / member, model, special_tokens=tokenizer.special_tokens,
                     tokenizer_dir=tokenizer_dir)
    return run


@pytest.fixture(scope="module")
def pair_task(tmp_path_factory):
    """A text-pair task in JSONL files: label "same" when both texts start with the same word."""
    rng = np.random.default_rng(zlib.crc32(b"pair_task"))
    root = tmp_path_factory.mktemp("task")
    for split, rows in (("train", 40), ("dev", 24)):
        lines = []
        for _ in range(rows):
            first, second = sentence(rng, 2, 12), sentence(rng, 2, 12)
            label = "same" if first.split()[0] == second.split()[0] else "different"
            lines.append(json.dumps({"q": first, "p": second, "y": label}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "pairs.yaml").write_text(
        "source: {files: {train: train.jsonl, validation: dev.jsonl}}\n"
        "text_field: q\npair_field: p\nlabel_field: y\nmetrics: [accuracy, f1]\n"
        "labels: [different, same]\nseeds: [5, 6]\n")
    return root / "pairs.yaml"


def _dev_rows(task_file):
    rows = [json.loads(line) for line in (task_file.parent / "dev.jsonl").read_text().splitlines()]
    return [r["q"] for r in rows], [r["p"] for r in rows], [r["y"] == "same" for r in rows]


def test_both_members_over_seeds_scored_by_transformers(pair, pair_task, tmp_path, capsys):
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert main(["finetune", str(pair), "--task", str(pair_task), *SETTINGS, "--seeds", "2",
                 "--run-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    texts, pairs, labels = _dev_rows(pair_task)
    for member, architecture in (("encoder", "ModernBertForSequenceClassification"),
                                 ("decoder", "ModernBertDecoderForSequenceClassification")):
        folder = tmp_path / "finetune" / "pairs" / member
        summary = read_summary(folder / "summary.json")
        assert summary.headline == "accuracy" and len(summary.seeds) == 2
        assert summary.summary["accuracy"]["n"] == 2
        mean = summary.summary["accuracy"]["mean"]
        assert f"pairs {member}: accuracy {mean:.4f} ±" in printed
        for index, seed in enumerate((5, 6)):  # the task's own seeds
            seed_dir = folder / f"seed{index}"
            results = json.loads((seed_dir / "results.json").read_text())
            assert results["seed"] == seed and results["metrics"] == summary.seeds[index]
            records = read_metrics(seed_dir)
            steps = 2 * 5  # 2 epochs of ceil(40 / 8) steps
            assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
            assert [r["epoch"] for r in records if "eval_accuracy" in r] == [1.0, 2.0]
            # The export, read by transformers with its own tokenizer, scored by scikit-learn,
            # gives the run's own dev metrics.
            hf = seed_dir / "hf"
            assert json.loads((hf / "config.json").read_text())["architectures"] == [architecture]
            tokenizer = AutoTokenizer.from_pretrained(hf)
            model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
            inputs = tokenizer(texts, pairs, padding=True, truncation="longest_first",
                               max_length=32, return_tensors="pt")
            with torch.no_grad():
                predicted = model(**inputs).logits.argmax(-1).numpy()
            assert results["metrics"]["accuracy"] == pytest.approx(
                accuracy_score(labels, predicted), abs=1e-12)
            assert results["metrics"]["f1"] == pytest.approx(
                f1_score(labels, predicted, zero_division=0), abs=1e-12)
    # Done seeds are read, not rerun: the same command changes nothing.
    before = (tmp_path / "finetune" / "pairs" / "encoder" / "seed1" / "results.json").stat()
    assert main(["finetune", str(pair), "--task", str(pair_task), *SETTINGS, "--seeds", "2",
                 "--member", "encoder", "--run-dir", str(tmp_path)]) == 0
    after = (tmp_path / "finetune" / "pairs" / "encoder" / "seed1" / "results.json").stat()
    assert before.st_mtime_ns == after.st_mtime_ns


def test_a_crashed_seed_resumes_to_the_uninterrupted_run(pair, pair_task, tmp_path,
                                                          monkeypatch):
    task, config = finetune_settings(str(pair_task), SETTINGS + ["checkpoint_every_steps=3",
                                                                 "classifier_dropout=0.1"])
    model, tokenizer = load_model(pair, "decoder")
    data = classification.encode_task(task, tokenizer, objective=model.objective)
    mesh = make_mesh(config.mesh)

    def run(out, config=config):
        return loop.run_seed(classification.classification_run(
            model, tokenizer, task, data, config, seed=7, mesh=mesh), config, mesh, out)

    whole = run(tmp_path / "whole")
    placed = loop.place
    calls = {"n": 0}

    def crash_at_step_8(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # a crash mid-epoch, after checkpoint 6
        return placed(batch, mesh)

    monkeypatch.setattr(loop, "place", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed")
    monkeypatch.setattr(loop, "place", placed)
    assert not (tmp_path / "crashed" / "results.json").exists()
    resumed = run(tmp_path / "crashed")
    assert resumed == whole
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "crashed") if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole")
                      if "loss" in r}
    # Resuming with another recipe is refused, naming what changed.
    other = dataclasses.replace(config, pooling="mean", logging_every_steps=5)
    with pytest.raises(CheckpointError, match=r"other settings \(pooling: 'last' -> 'mean'\)"):
        run(tmp_path / "crashed", other)  # finished
    (tmp_path / "crashed" / "results.json").unlink()
    with pytest.raises(CheckpointError, match=r"other settings \(pooling: 'last' -> 'mean'\)"):
        run(tmp_path / "crashed", other)  # checkpointed


def test_glue_presets_from_a_prepared_copy(pair, glue_dir, tmp_path, capsys):
    data_dir, _ = glue_dir
    common = ["--member", "encoder", "--run-dir", str(tmp_path), f"data_dir={data_dir}",
              "epochs=1", "batch_size=4", "max_length=32", "eval_batch_size=8"]
    assert main(["finetune", str(pair), "--task", "stsb", *common]) == 0
    stsb = read_summary(tmp_path / "finetune" / "stsb" / "encoder" / "summary.json")
    assert stsb.headline == "pearson" and set(stsb.summary) == {"pearson", "spearman"}
    # RTE starts from MNLI's fine-tuned model, as Ettin did, when MNLI was fine-tuned here.
    assert main(["finetune", str(pair), "--task", "rte", *common]) == 0
    assert "Ettin starts rte from mnli, which is not fine-tuned" in capsys.readouterr().err
    assert main(["finetune", str(pair), "--task", "mnli", *common]) == 0
    mnli = read_summary(tmp_path / "finetune" / "mnli" / "encoder" / "summary.json")
    assert set(mnli.summary) == {"accuracy", "validation_mismatched/accuracy"}
    rte = tmp_path / "finetune" / "rte" / "encoder"
    assert json.loads((rte / "seed0" / "results.json").read_text())["settings"][
        "start_from"] is None
    shutil.rmtree(rte)
    assert main(["finetune", str(pair), "--task", "rte", *common]) == 0
    assert "not fine-tuned" not in capsys.readouterr().err
    started = json.loads((rte / "seed0" / "results.json").read_text())["settings"]["start_from"]
    assert started == str(tmp_path / "finetune" / "mnli" / "encoder" / "seed0" / "hf")


@pytest.mark.parametrize("args, message", [
    (["learning_rat=1e-5"], "unknown setting 'learning_rat'. Did you mean 'learning_rate'?"),
    (["pooling=cls", "--member", "decoder"], "pooling"),
    (["epochs=0"], "epochs must be >= 1"),
])
def test_bad_settings_name_the_key(pair, pair_task, tmp_path, capsys, args, message):
    assert main(["finetune", str(pair), "--task", str(pair_task), *args,
                 "--run-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_task_says_which_exist(pair, tmp_path, capsys):
    assert main(["finetune", str(pair), "--task", "mrcp", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mrcp'" in err and "mrpc" in err


def test_devices_split_the_rows(pair, pair_task, tmp_path):
    """Batches padded to the device count with weight-0 rows: 8 devices and 1 give the same
    first losses (rtol 1e-5: rows are summed in another order)."""
    task, config = finetune_settings(str(pair_task), SETTINGS + ["batch_size=6", "epochs=1"])
    model, tokenizer = load_model(pair, "encoder")
    data = classification.encode_task(task, tokenizer, objective=model.objective)
    losses = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(config.mesh, devices)
        out = tmp_path / f"d{len(devices)}"
        loop.run_seed(classification.classification_run(
            model, tokenizer, task, data, config, seed=3, mesh=mesh), config, mesh, out)
        losses.append([r["loss"] for r in read_metrics(out) if "loss" in r])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_seeds_share_one_compiled_update_step(rng):
    """The seed's dropout key is an argument of the update step, not a constant: the seeds of a
    sweep run one compiled program, and each seed's dropout is its own and reproducible."""
    import jax.numpy as jnp

    from ettin_jax.config.schema import OptimizerConfig
    from ettin_jax.training.optimizer import make_optimizer
    from ettin_jax.training.schedules import token_count
    from ettin_jax.training.state import TrainState

    def loss_and_grads(params, batch, key):
        keep = jax.random.bernoulli(key, 0.5, batch["x"].shape)  # a dropout mask

        def loss(p):
            return jnp.sum(jnp.where(keep, batch["x"] * p["w"], 0.0) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        return value, grads, {}

    optimizer = make_optimizer(OptimizerConfig())
    params = {"w": jnp.asarray(rng.normal(size=64), jnp.float32)}
    zero = jnp.zeros([], jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=optimizer.init(params), skipped=zero,
                       nonfinite_streak=zero, phase_tokens=jnp.asarray(token_count(0)))
    step = jax.jit(loop.make_update_step(loss_and_grads, optimizer,
                                         loop.learning_rate_schedule(1e-3, 0.1, 0.0, 10)))
    batch = {"x": jnp.asarray(rng.normal(size=64), jnp.float32)}
    seeds = [int(s) for s in rng.choice(1 << 20, 2, replace=False)]
    losses = [float(step(state, batch, jax.random.key(seed))[1]["loss"])
              for seed in (*seeds, seeds[0])]
    assert step._cache_size() == 1  # noqa: SLF001 - one program for every seed
    assert losses[0] != losses[1] and losses[0] == losses[2]


def test_an_exported_member_fine_tunes_too(pair, pair_task, tmp_path, capsys):
    """SOURCE may be a HuggingFace directory (`ettin-jax export`'s): its one member is found
    from config.json, and the results go under --run-dir."""
    from ettin_jax.hf.transfer import export_checkpoint

    exported = export_checkpoint(pair / "decoder", tmp_path / "hf")[""].path
    assert main(["finetune", str(exported), "--task", str(pair_task), *SETTINGS, "epochs=1",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert "pairs decoder: accuracy" in capsys.readouterr().out
    assert (tmp_path / "run" / "finetune" / "pairs" / "decoder" / "summary.json").is_file()
    assert not (tmp_path / "run" / "finetune" / "pairs" / "encoder").exists()


@pytest.fixture(scope="module")
def triplets_task(tmp_path_factory):
    """A retrieval task file: 24 training triplets (query, positive, one hard negative) and 12
    held-out triplets ranked as a retrieval set."""
    rng = np.random.default_rng(zlib.crc32(b"triplets_task"))
    root = tmp_path_factory.mktemp("retrieval")
    for name, count in (("train", 24), ("dev", 12)):
        rows = []
        for _ in range(count):
            topic = sentence(rng, 2, 5)
            rows.append({"query": topic, "positive": f"{topic} {sentence(rng, 4, 12)}",
                         "negatives": [sentence(rng, 4, 12)]})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "search.yaml").write_text(
        "preset: msmarco\ntrain_path: train.jsonl\neval_path: dev.jsonl\nbatch_size: 8\n"
        "mini_batch_size: 4\nmax_query_length: 16\nmax_document_length: 32\nepochs: 2\n"
        "learning_rate: 1e-3\nmetrics: [ndcg@10, mrr@10, recall@10]\nseeds: [4]\n"
        "negatives_field: negatives\n")
    return root / "search.yaml"


def test_retrieval_both_members_and_the_sentence_transformers_export(pair, triplets_task,
                                                                      tmp_path, capsys):
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    assert main(["finetune", str(pair), "--task", f"retrieval:{triplets_task}",
                 "eval_batch_size=8", "--run-dir", str(tmp_path)]) == 0
    assert "search encoder: ndcg@10" in capsys.readouterr().out
    dev = [json.loads(line) for line in
           (triplets_task.parent / "dev.jsonl").read_text().splitlines()]
    for member, pooling in (("encoder", "mean"), ("decoder", "lasttoken")):
        seed = tmp_path / "finetune" / "search" / member / "seed0"
        results = json.loads((seed / "results.json").read_text())
        assert results["settings"]["pooling"] == pooling and results["steps"] == 2 * 3
        assert [r["epoch"] for r in read_metrics(seed) if "eval_ndcg@10" in r] == [1.0, 2.0]
        # The export ranks the held-out set as the run did: sentence-transformers' embeddings,
        # cosine ranking and trec_eval's metrics give the run's own figures.
        model = SentenceTransformer(str(seed / "hf"), device="cpu", local_files_only=True)
        queries = model.encode([r["query"] for r in dev], convert_to_numpy=True)
        documents = [text for r in dev for text in (r["positive"], *r["negatives"])]
        corpus = model.encode(documents, convert_to_numpy=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        scores = queries @ corpus.T
        ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(documents))}
        run = {f"q{i}": {ids[text]: float(scores[i, j]) for j, text in enumerate(documents)}
               for i in range(len(dev))}
        qrels = {f"q{i}": {ids[r["positive"]]: 1} for i, r in enumerate(dev)}
        found = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank"}).evaluate(run)
        ndcg = np.mean([q["ndcg_cut_10"] for q in found.values()])
        assert results["metrics"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-6)
