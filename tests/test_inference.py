"""Inference: the decoder's KV cache against the full forward, greedy generation and fill-mask
against transformers' ModernBERT classes (exported with save_pretrained; torch CPU, eager,
fp32), logit filtering against numpy, sampling, and argument errors.

Small models: 4 layers (global, local, local, global), hidden 64, 4 heads of 16, vocab 400,
a local window of 8 (the decoder's local layers see the 4 most recent keys, the encoder's
|i - j| <= 4), sequences several times longer, distinct global and local RoPE thetas. Weights
are initialised 10x wider than Ettin's (std 0.2): at 0.02 the attention branch moves the logits
so little that a wrong RoPE theta or a missing [SEP] stays below the tolerances.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import randomized_model, run_logits, small_config
from flax import nnx
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from data_pipelines.corpus import bundled_documents
from data_pipelines.tokenizers import train_tokenizer
from ettin_jax.hf.pretrained import save_pretrained
from ettin_jax.inference import fill_mask, filter_logits, generate, sample_next
from ettin_jax.models.decoding import decode_step, init_cache, prefill

VOCAB = 400
LOCAL_ATTENTION = 8
DECODER_WINDOW = LOCAL_ATTENTION // 2


def _module_rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{__name__}::{name}".encode()))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A unigram tokenizer (vocab 400, specials at 0..4) trained on 400 lines of the corpus."""
    documents = bundled_documents("train")[:20]
    lines = [line for d in documents for line in d.text.splitlines() if line.strip()][:400]
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB, texts=lines)


@pytest.fixture(scope="module")
def config():
    rng = _module_rng("config")
    return small_config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_heads=4,
        local_attention=LOCAL_ATTENTION, init_std=0.2,
        global_rope_theta=float(rng.choice([160_000.0, 80_000.0])),
        local_rope_theta=float(rng.choice([10_000.0, 5_000.0])),
    )


@pytest.fixture(scope="module")
def decoder(config, tokenizer):
    """A randomized decoder whose EOS logit is pushed down, so that greedy runs are long."""
    model = randomized_model(config, "clm", seed=int(_module_rng("decoder").integers(1 << 30)))
    model.decoder_bias[...] = model.decoder_bias[...].at[tokenizer.special_tokens.eos].add(-30.0)
    return model


@pytest.fixture(scope="module")
def encoder(config):
    return randomized_model(config, "mlm", seed=int(_module_rng("encoder").integers(1 << 30)))


def _prompt(tokenizer, rng, words: int) -> str:
    """Random words of the tokenizer's own vocabulary (no special pieces)."""
    pieces = [tokenizer.id_to_token(i) for i in range(5, tokenizer.vocab_size)]
    pieces = [p.replace("\u2581", "") for p in pieces if p.startswith("\u2581") and len(p) > 2]
    return " ".join(rng.choice(pieces, size=words))


def test_cache_logits_equal_full_forward(decoder, rng):
    batch, seq = 2, 6 * DECODER_WINDOW + 1
    ids = jnp.asarray(rng.integers(0, VOCAB, (batch, seq)))
    expected = np.asarray(run_logits(decoder, ids))  # [B, S, V]
    scale = np.abs(expected).max()
    assert scale > 0.1

    first = int(rng.integers(1, DECODER_WINDOW))
    chunk = 3  # a second prefill: several tokens at a non-zero start
    cache = init_cache(decoder, batch, seq)
    got = {}
    logits, cache = prefill(decoder, ids[:, :first], cache)
    got[first - 1] = logits
    logits, cache = prefill(decoder, ids[:, first:first + chunk], cache)
    got[first + chunk - 1] = logits
    for i in range(first + chunk, seq):
        logits, cache = decode_step(decoder, ids[:, i], cache)
        got[i] = logits
    assert int(cache.length) == seq
    for position, logits in got.items():
        diff = np.abs(np.asarray(logits) - expected[:, position]).max()
        assert diff <= 1e-5 * scale, (position, diff)
    # The last step saw more keys than the local window: the window is exercised.
    assert seq - first - chunk > DECODER_WINDOW


def _export(model, tokenizer, path, auto_class):
    save_pretrained(model, path, special_tokens=tokenizer.special_tokens)
    return auto_class.from_pretrained(path, attn_implementation="eager").eval()


def test_greedy_generate_equals_transformers(decoder, tokenizer, rng, tmp_path):
    reference = _export(decoder, tokenizer, tmp_path, AutoModelForCausalLM)
    new_tokens = 5 * DECODER_WINDOW
    result = generate(decoder, tokenizer, _prompt(tokenizer, rng, 6), max_new_tokens=new_tokens)
    assert result.prompt_ids[0] == tokenizer.special_tokens.cls
    prompt = torch.tensor([result.prompt_ids])
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      do_sample=False, max_new_tokens=new_tokens)
    expected = expected[0, prompt.shape[1]:].tolist()
    assert len(expected) == new_tokens  # EOS is suppressed by the decoder fixture's bias
    assert list(result.token_ids) == expected
    assert result.finish_reason == "length"
    assert result.text == tokenizer.decode(expected)


def test_generation_stops_at_eos(decoder, tokenizer):
    eager = nnx.clone(decoder)
    eos = tokenizer.special_tokens.eos
    eager.decoder_bias[...] = eager.decoder_bias[...].at[eos].add(100.0)
    stopped = generate(eager, tokenizer, "the", max_new_tokens=4)
    assert stopped.token_ids == (eos,) and stopped.finish_reason == "eos"
    running = generate(eager, tokenizer, "the", max_new_tokens=4, stop_at_eos=False)
    assert running.token_ids == (eos,) * 4 and running.finish_reason == "length"


def test_fill_mask_equals_transformers(encoder, tokenizer, rng, tmp_path):
    reference = _export(encoder, tokenizer, tmp_path, AutoModelForMaskedLM)
    words = _prompt(tokenizer, rng, 14).split()
    for index in sorted(rng.choice(len(words), size=2, replace=False), reverse=True):
        words[index] = "[MASK]"
    text = " ".join(words)
    top_k = 5
    predictions = fill_mask(encoder, tokenizer, text, top_k=top_k)

    special = tokenizer.special_tokens
    ids = np.concatenate([[special.cls], tokenizer.encode(text), [special.sep]])
    assert len(ids) > 2 * LOCAL_ATTENTION  # local layers see only part of the text
    with torch.no_grad():
        logits = reference(input_ids=torch.from_numpy(ids[None]).long()).logits[0]
    probs = torch.softmax(logits[torch.from_numpy(ids == special.mask)], dim=-1)
    expected_probs, expected_ids = torch.topk(probs, top_k, dim=-1)
    assert len(predictions) == 2
    for row, want_ids, want_probs in zip(predictions, expected_ids.tolist(),
                                         expected_probs.numpy()):
        assert [token_id for _, token_id, _ in row] == want_ids
        np.testing.assert_allclose([p for _, _, p in row], want_probs, rtol=0, atol=1e-5)
        assert [token for token, _, _ in row] == [tokenizer.id_to_token(i) for i in want_ids]


def _numpy_filter(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Row by row: drop all but the top_k largest, then keep the most probable tokens until
    their probability (softmax of what is left) reaches top_p."""
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k is not None:
            row[row < np.sort(row)[::-1][min(top_k, row.size) - 1]] = -np.inf
        if top_p is not None:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            kept, total = [], 0.0
            for index in np.argsort(-row):
                kept.append(index)
                total += probs[index]
                if total >= top_p:
                    break
            row[np.setdiff1d(np.arange(row.size), kept)] = -np.inf
    return out


@pytest.mark.parametrize("top_k, top_p", [(7, None), (None, 0.6), (12, 0.8), (None, None),
                                          (100, None)])
def test_filter_logits_equals_numpy(top_k, top_p, rng):
    logits = rng.normal(0.0, 2.0, (4, 40)).astype(np.float32)
    expected = _numpy_filter(logits, top_k, top_p)
    actual = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(actual[kept], logits[kept])
    if top_k is not None and top_k < logits.shape[1]:
        assert (kept.sum(axis=1) <= top_k).all()
    if top_p is not None:
        assert (kept.sum(axis=1) < logits.shape[1]).all()  # the nucleus filter did cut


def test_sampling_follows_filtered_softmax(rng):
    # Evenly spread logits: temperature 2 changes the kept tokens' probabilities by ~0.1.
    spread = np.linspace(0.0, 4.0, 10) + rng.normal(0.0, 0.1, 10)
    logits = rng.permutation(spread)[None].astype(np.float32)
    temperature, top_k, top_p = 2.0, 6, 0.9
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 6000)
    draws = np.asarray(jax.vmap(lambda key: sample_next(
        jnp.asarray(logits), key, temperature=temperature, top_k=top_k, top_p=top_p))(keys))
    filtered = _numpy_filter(logits / temperature, top_k, top_p)[0]
    expected = np.exp(filtered - filtered.max())
    expected /= expected.sum()
    frequency = np.bincount(draws[:, 0], minlength=logits.shape[1]) / len(draws)
    assert 3 <= np.count_nonzero(expected) < top_k  # both filters cut, several tokens remain
    assert (frequency[expected == 0] == 0).all()
    np.testing.assert_allclose(frequency, expected, atol=0.03)


def test_sampled_generation_is_reproducible_and_top_1_is_greedy(decoder, tokenizer, rng):
    prompt = _prompt(tokenizer, rng, 3)

    def run(**kwargs):
        return generate(decoder, tokenizer, prompt, max_new_tokens=12, **kwargs).token_ids

    sampled = run(temperature=1.5, top_k=50, top_p=0.95, seed=3)
    assert run(temperature=1.5, top_k=50, top_p=0.95, seed=3) == sampled
    assert run(temperature=1.5, top_k=50, top_p=0.95, seed=4) != sampled
    assert run(temperature=1.0, top_k=1, seed=5) == run(temperature=0.0)


def test_errors(encoder, decoder, tokenizer):
    with pytest.raises(ValueError, match="generate needs a decoder"):
        generate(encoder, tokenizer, "the", max_new_tokens=2)
    with pytest.raises(ValueError, match="fill_mask needs an encoder"):
        fill_mask(decoder, tokenizer, "the [MASK]")
    with pytest.raises(ValueError, match="no mask token"):
        fill_mask(encoder, tokenizer, "no mask here")
    for bad, match in [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
                       (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            generate(decoder, tokenizer, "the", **{"max_new_tokens": 2, **bad})
    with pytest.raises(ValueError, match="objective 'clm'"):
        init_cache(encoder, 1, 8)
    cache = init_cache(decoder, 1, 4)
    with pytest.raises(ValueError, match="exceed the cache's max_len 4"):
        prefill(decoder, jnp.ones((1, 5), jnp.int32), cache)
    _, cache = prefill(decoder, jnp.ones((1, 4), jnp.int32), cache)
    with pytest.raises(ValueError, match="exceed"):
        decode_step(decoder, jnp.ones((1,), jnp.int32), cache)
