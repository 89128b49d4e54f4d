"""The lm-eval model type `ettin-jax` (ettin_jax.lm_harness) against independent references.

Decoder: lm-eval's own `hf` backend on the exported decoder (torch CPU, fp32) runs the same
three offline tasks (local JSONL data and task YAMLs through include_path): multiple choice
(loglikelihood, some contexts longer than max_length), perplexity (loglikelihood_rolling, texts
of several windows) and generation (generate_until with a stop sequence, some prompts
left-truncated); every request's log-likelihood, every generation and the task metrics must
agree. Encoder: transformers' ModernBertForMaskedLM on the exported encoder, scored with the
procedure of Ettin's lm-eval fork written out here step by step (lm_eval/api/model.py
`_encode_pair` and lm_eval/models/huggingface.py `_loglikelihood_tokens` with is_encoder,
utils.py `EncoderAsPseudoCausalLM`). Plus argument errors, EOS, lm-eval's CLI, and the shape
buckets.

The tiny pair: 3 layers (global, local, local), hidden 64, vocab 512 (the session tokenizer),
a local window of 8, weights 10x wider than Ettin's so that a misplaced token moves the scores.
"""

from __future__ import annotations

import json
import os
import zlib
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import randomized_model, small_config  # noqa: E402
from flax import nnx  # noqa: E402

from data_pipelines.tokenizers import load_tokenizer  # noqa: E402
from ettin_jax.errors import CheckpointError, ConfigError  # noqa: E402
from ettin_jax.hf.transfer import export_checkpoint  # noqa: E402
from ettin_jax.lm_harness import EttinJaxLM, bucket_length, run_lm_eval_cli  # noqa: E402
from ettin_jax.training.checkpoint import save_weights  # noqa: E402

MAX_LENGTH = 40
MAX_GEN_TOKS = 10
TASKS = ("tiny_mc", "tiny_ppl", "tiny_gen")


def _module_rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{__name__}::{name}".encode()))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir, tokenizer):
    """A random encoder and decoder saved as a run directory and exported to HF directories."""
    rng = _module_rng("pair")
    config = small_config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_heads=4,
        num_layers=3, local_attention=8, init_std=0.2,
        global_rope_theta=float(rng.choice([160_000.0, 80_000.0])),
        local_rope_theta=float(rng.choice([10_000.0, 5_000.0])),
    )
    decoder = randomized_model(config, "clm", seed=int(rng.integers(1 << 30)))
    # Generation never picks a byte-fallback piece: SentencePiece and the exported
    # tokenizer.json decode an invalid UTF-8 byte run differently (see the report of issue 17).
    byte_ids = [i for i in range(tokenizer.vocab_size)
                if tokenizer.id_to_token(i).startswith("<0x")]
    decoder.decoder_bias[...] = decoder.decoder_bias[...].at[np.asarray(byte_ids)].add(-30.0)
    encoder = randomized_model(config, "mlm", seed=int(rng.integers(1 << 30)))
    root = tmp_path_factory.mktemp("pair")
    for name, model in (("decoder", decoder), ("encoder", encoder)):
        save_weights(root / "run" / name, model, special_tokens=tokenizer.special_tokens,
                     tokenizer_dir=tokenizer_dir)
    export_checkpoint(root / "run", root / "hf")
    return SimpleNamespace(run=root / "run", hf=root / "hf", decoder=decoder, encoder=encoder)


def _words(tokenizer, rng, count: int) -> str:
    pieces = [tokenizer.id_to_token(i) for i in range(5, tokenizer.vocab_size)]
    pieces = [p[1:] for p in pieces if p.startswith("\u2581") and len(p) > 2]
    return " ".join(rng.choice(pieces, size=count))


def _task_yaml(name: str, data, output_type: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\noutput_type: {output_type}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tokenizer):
    """Three offline lm-eval tasks over random words of the tokenizer's vocabulary."""
    rng = _module_rng("tasks")
    out = tmp_path_factory.mktemp("tasks")
    words = lambda n: _words(tokenizer, rng, n)  # noqa: E731
    docs = {
        "mc": [{"question": words(int(n)), "choices": [words(int(k)) for k in
                                                       rng.integers(1, 4, 4)],
                "label": int(rng.integers(4))} for n in [3, 5, 8, 30, 4, 6]],
        "ppl": [{"text": words(int(n))} for n in [4, 12, 45, 20]],
        "gen": [{"prompt": words(int(n)), "answer": words(1)} for n in [2, 7, 4, 30, 3, 9, 5]],
    }
    for name, rows in docs.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metric = "metric_list:\n" + "".join(
        f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: {h}\n"
        for m, a, h in [("acc", "mean", "true"), ("acc_norm", "mean", "true")])
    (out / "tiny_mc.yaml").write_text(_task_yaml(
        "tiny_mc", out / "mc.jsonl", "multiple_choice",
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n' + metric))
    (out / "tiny_ppl.yaml").write_text(_task_yaml(
        "tiny_ppl", out / "ppl.jsonl", "loglikelihood_rolling",
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    (out / "tiny_gen.yaml").write_text(_task_yaml(
        "tiny_gen", out / "gen.jsonl", "generate_until",
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["an"]\n  max_gen_toks: {MAX_GEN_TOKS}\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
        "    aggregation: mean\n    higher_is_better: true\n"))
    return out


def _evaluate(task_dir, tasks, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Without lm-eval's own 200+ task folders, whose indexing takes seconds.
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(tasks=list(tasks), task_manager=manager, log_samples=True,
                                   **kwargs)


@pytest.fixture(scope="module")
def decoder_runs(pair, task_dir):
    """The three tasks through ettin-jax (the run's decoder, batches of 3) and lm-eval's hf."""
    # lm-eval's hf backend imports accelerate (lm-eval's [hf] extra; in the test extra).
    ours = _evaluate(task_dir, TASKS, model="ettin-jax", model_args=(
        f"path={pair.run / 'decoder'},max_length={MAX_LENGTH},batch_size=3"))
    reference = _evaluate(task_dir, TASKS, model="hf", device="cpu", batch_size=1, model_args=(
        f"pretrained={pair.hf / 'decoder'},dtype=float32,max_length={MAX_LENGTH},"
        f"add_bos_token=True"))
    return ours, reference


def _responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task],
                                                 key=lambda s: s["doc_id"])]


def test_decoder_loglikelihoods_equal_hf_backend(decoder_runs):
    ours, reference = decoder_runs
    for task in ("tiny_mc", "tiny_ppl"):
        got, want = _responses(ours, task), _responses(reference, task)
        assert len(got) == len(want) > 0
        for doc_got, doc_want in zip(got, want):
            assert len(doc_got) == len(doc_want)
            for (response,), (expected,) in zip(doc_got, doc_want):
                if task == "tiny_mc":
                    assert abs(response[0] - expected[0]) <= 1e-4, (task, response, expected)
                    assert response[1] == expected[1]
                else:
                    assert abs(response - expected) <= 1e-4, (task, response, expected)
    assert ours["results"]["tiny_mc"]["acc,none"] == reference["results"]["tiny_mc"]["acc,none"]
    assert (ours["results"]["tiny_mc"]["acc_norm,none"]
            == reference["results"]["tiny_mc"]["acc_norm,none"])
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"]["tiny_ppl"][metric],
                                   reference["results"]["tiny_ppl"][metric], rtol=1e-5)


def test_decoder_generations_equal_hf_backend(decoder_runs):
    ours, reference = decoder_runs
    got, want = _responses(ours, "tiny_gen"), _responses(reference, "tiny_gen")
    assert got == want
    assert any(text for (text,) in got)
    assert (ours["results"]["tiny_gen"]["exact_match,none"]
            == reference["results"]["tiny_gen"]["exact_match,none"])


def _fork_encoder_score(model, hf_tokenizer, context_ids, continuation_ids, max_length):
    """Ettin's fork, step by step: for each continuation token, the context and the tokens
    before it, then [MASK] at the scored position, two more [MASK] and [SEP]
    (EncoderAsPseudoCausalLM._prepare_masked_input_for_position), logits at index -4. Rows
    over max_length lose their oldest tokens after [CLS] (ettin-jax's extension). The rows of
    one continuation run as one right-padded batch (attention_mask)."""
    import torch

    mask, sep = hf_tokenizer.mask_token_id, hf_tokenizer.sep_token_id
    rows = []
    for i in range(len(continuation_ids)):
        masked = list(context_ids) + list(continuation_ids[:i]) + [mask] + [mask, mask] + [sep]
        if len(masked) > max_length:
            masked = masked[:1] + masked[len(masked) - max_length + 1:]
        rows.append(masked)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [hf_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    scored = logits[torch.arange(len(rows)), torch.tensor([len(r) - 4 for r in rows])]
    logp = torch.log_softmax(scored.double(), -1)[torch.arange(len(rows)),
                                                   torch.tensor(continuation_ids)]
    greedy = scored.argmax(-1) == torch.tensor(continuation_ids)
    return float(logp.sum()), bool(greedy.all())


def test_encoder_scores_follow_ettin_fork(pair, task_dir):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    ours = _evaluate(task_dir, ("tiny_mc", "tiny_ppl"), model="ettin-jax",
                     model_args=f"path={pair.hf / 'encoder'},max_length={MAX_LENGTH}")
    reference = AutoModelForMaskedLM.from_pretrained(
        pair.hf / "encoder", attn_implementation="eager", dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(pair.hf / "encoder")
    sep = hf_tokenizer.sep_token_id

    correct = []
    samples = sorted(ours["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    for sample in samples:
        doc = sample["doc"]
        scores = []
        for choice, ((got, got_greedy),) in zip(doc["choices"], sample["resps"]):
            # lm-eval's request: (question + " ", choice); the fork's _encode_pair for encoders.
            context, continuation = doc["question"], " " + choice
            context_ids = hf_tokenizer.encode(context)[:-1]
            continuation_ids = hf_tokenizer.encode(continuation, add_special_tokens=False)
            want, want_greedy = _fork_encoder_score(reference, hf_tokenizer, context_ids,
                                                    continuation_ids + [sep], MAX_LENGTH)
            assert abs(got - want) <= 1e-4, (doc, choice, got, want)
            assert got_greedy == want_greedy
            scores.append(want)
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert ours["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))

    for sample in ours["samples"]["tiny_ppl"]:
        text_ids = hf_tokenizer.encode(sample["doc"]["text"], add_special_tokens=False)
        want, _ = _fork_encoder_score(reference, hf_tokenizer, [hf_tokenizer.cls_token_id],
                                      text_ids + [sep], MAX_LENGTH)
        assert abs(sample["resps"][0][0] - want) <= 1e-4
    assert max(len(s["doc"]["text"].split()) for s in ours["samples"]["tiny_ppl"]) > MAX_LENGTH


def _instances(request_type: str, arguments: list[tuple], task: str = "tiny_gen") -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=args, idx=0,
                     metadata=(task, i, 1)) for i, args in enumerate(arguments)]


def test_encoder_refuses_generation(pair, tokenizer):
    lm = EttinJaxLM.from_model(pair.encoder, tokenizer)
    with pytest.raises(ConfigError, match="encoder cannot run generate_until.*tiny_gen"):
        lm.generate_until(_instances("generate_until", [("a b", {"until": ["."]})]))


def test_generation_stops_at_eos(pair, tokenizer):
    eager = nnx.clone(pair.decoder)
    eos = tokenizer.special_tokens.eos
    eager.decoder_bias[...] = eager.decoder_bias[...].at[eos].add(100.0)
    lm = EttinJaxLM.from_model(eager, tokenizer, batch_size=2, max_gen_toks=4)
    requests = _instances("generate_until", [("the", {}), ("a much longer prompt here", {})])
    assert lm.generate_until(requests) == ["", ""]
    running = EttinJaxLM.from_model(pair.decoder, tokenizer, batch_size=2, max_gen_toks=4)
    assert all(running.generate_until(requests))
    without_bos = EttinJaxLM.from_model(pair.decoder, tokenizer, add_bos_token=False,
                                        max_gen_toks=3)
    (text,) = without_bos.generate_until(_instances("generate_until", [("", {})]))
    assert isinstance(text, str)


def test_model_args_batch_size_wins_over_the_command_line_default(pair):
    model = EttinJaxLM.create_from_arg_string(f"path={pair.run}/decoder,batch_size=4",
                                              {"batch_size": 1, "device": None})
    assert model.batch_size == 4
    assert EttinJaxLM.create_from_arg_string(f"path={pair.run}/decoder",
                                             {"batch_size": 2}).batch_size == 2


@pytest.mark.parametrize("model_args, error, message", [
    ("path={run}/decoder,membr=decoder", ConfigError, "unknown model_args membr.*'member'"),
    ("path={run}", ConfigError, "holds both members"),
    ("path={run},member=both", ConfigError, "member must be encoder or decoder"),
    ("path={run}/decoder,batch_size=0", ConfigError, "batch_size must be a positive"),
    ("path={run}/decoder,add_bos_token=yes", ConfigError, "add_bos_token must be"),
    ("path={run}/encoder,max_length=4", ConfigError, "max_length must be >= 5"),
    ("member=decoder", ConfigError, "needs model_args path="),
    ("path={run}/nothing", CheckpointError, "does not exist"),
    ("path={run},member=decoder,batch_size=auto", ConfigError, "batch_size.*'auto'"),
    ("path={hf}/encoder,member=decoder", CheckpointError, "not the decoder"),
])
def test_bad_model_args(pair, model_args, error, message):
    with pytest.raises(error, match=message):
        EttinJaxLM.create_from_arg_string(model_args.format(run=pair.run, hf=pair.hf))


def test_lm_eval_cli(pair, task_dir, decoder_runs, tmp_path, monkeypatch):
    import functools

    import lm_eval.tasks

    ours, _ = decoder_runs
    # The command line indexes lm-eval's own task folders too (seconds): not needed here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(
        lm_eval.tasks.TaskManager, include_defaults=False))

    def no_fork():
        raise AssertionError("os.fork() in a process running JAX's threads")

    monkeypatch.setattr(os, "fork", no_fork)
    from ettin_jax.cli import main

    # Batches of 3, as decoder_runs': the programs it compiled serve here too.
    code = main([  # `ettin-jax lm-eval ...`: lm-eval's own command line, the model registered
        "lm-eval", "--model", "ettin-jax", "--model_args",
        f"path={pair.run},member=decoder,max_length={MAX_LENGTH}",
        "--tasks", "tiny_mc", "--include_path", str(task_dir), "--batch_size", "3",
        "--output_path", str(tmp_path)])
    assert code == 0
    (written,) = tmp_path.glob("**/results_*.json")
    results = json.loads(written.read_text())
    assert results["config"]["model"] == "ettin-jax"
    assert results["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
    assert run_lm_eval_cli(["run", "--no-such-option"]) == 2


def test_bucket_length():
    sizes = {bucket_length(n) for n in range(1, 8193)}
    assert len(sizes) <= 44
    for n in range(1, 8193):
        up, down = bucket_length(n), bucket_length(n, down=True)
        assert n <= up <= max(16, 1.25 * n) and up % 4 == 0
        assert down <= n and (n < 16 or down >= 0.8 * n)
        assert bucket_length(up) == up
