"""The model against an independent reference: transformers' ModernBERT classes (torch, CPU,
eager attention), through the one key map in ettin_jax.hf.keymap: in fp32 under both precision
policies, and in bf16 with precision "autocast" against torch.autocast (how Ettin trained)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    HF_CASES,
    case_config,
    case_id,
    flat_params,
    padded_batch,
    randomized_model,
    run_hidden,
    run_logits,
    small_config,
)
from transformers import (
    ModernBertConfig,
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
)

from ettin_jax.hf.keymap import TIED_HF_NAMES, from_hf_tensors, to_hf_tensors
from ettin_jax.models import model_from_params

BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7: bf16 keeps 8 significant bits


def reference_model(config, objective, tensors):
    """A transformers model with `config`'s architecture holding `tensors` (tied decoder)."""
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        local_attention=config.local_attention,
        layer_types=[
            "full_attention" if kind == "global" else "sliding_attention"
            for kind in config.layer_types
        ],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        norm_eps=config.norm_eps,
        hidden_activation="gelu",
        classifier_activation="gelu",
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        tie_word_embeddings=True,
    )
    if objective == "mlm":
        hf_config, cls = ModernBertConfig(**fields), ModernBertForMaskedLM
    else:
        hf_config, cls = ModernBertDecoderConfig(**fields), ModernBertDecoderForCausalLM
    hf_config._attn_implementation = "eager"
    model = cls(hf_config).eval()
    missing, unexpected = model.load_state_dict(
        {name: torch.tensor(array) for name, array in tensors.items()}, strict=False
    )
    assert set(missing) == set(TIED_HF_NAMES) and not unexpected, (missing, unexpected)
    return model


@pytest.mark.parametrize("precision", ["uniform", "autocast"])
@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_logits_match_transformers(objective, case, precision, rng):
    config = dataclasses.replace(case_config(case, rng), precision=precision)  # fp32
    model = randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
    tensors = to_hf_tensors(flat_params(model), config, objective)
    reference = reference_model(config, objective, tensors)

    ids, attention_mask = padded_batch(case["seq"], config.vocab_size, rng)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask)
        ).logits.numpy()
    actual = np.asarray(
        run_logits(model, jnp.asarray(ids), jnp.asarray(attention_mask, dtype=jnp.int32))
    )
    real = attention_mask.astype(bool)
    assert np.abs(actual - expected)[real].max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero arrays


def _torch_run(reference, ids, attention_mask, *, autocast):
    """(final hidden states, logits) of the transformers model, fp32 or under CPU bf16 autocast."""
    inputs = {"input_ids": torch.from_numpy(ids),
              "attention_mask": torch.from_numpy(attention_mask)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return reference.model(**inputs).last_hidden_state, reference(**inputs).logits


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_bf16_autocast_matches_torch_autocast(objective, case, rng):
    """precision "autocast" with dtype bfloat16 computes what the transformers model in fp32
    weights computes under torch.autocast("cpu", bfloat16) (Ettin's Composer amp_bf16), and
    precision "uniform" (everything in bf16) measurably does not.

    Ettin's init scale (0.02; random norm scales and bias), random ids with padding. Tolerances
    in units of bf16's epsilon (2**-7) times the largest magnitude of the compared quantity:
      - final hidden states (the final norm's output: fp32 in torch autocast and in ours): both
        keep the residual stream and the LayerNorms in fp32, so they differ only where a bf16
        branch output (a Wo or Wi matmul, GELU) rounds the other way after a different
        accumulation order. Such a flip moves a branch element by one ulp of the branch, and
        branches are small next to the stream: bound eps / 16 (measured below eps / 100).
        Uniform rounds the stream and the norm outputs to bf16, an error of up to eps / 2 of
        each value: it must exceed eps / 4 (measured above 1 eps).
      - logits: torch autocast returns bf16 logits (the decoder Linear), a rounding of up to
        eps / 2; ours accumulate the same bf16 inputs in fp32. Bound eps: that rounding plus as
        much again for the bf16 head upstream (measured up to 0.7 eps). CPU autocast also runs
        the head's LayerNorm in bf16 (CUDA autocast, which Ettin used, runs it in fp32 as we
        do); its output is rounded to bf16 for the decoder on both sides anyway.
      - uniform's mean logit error is at least 1.3x autocast's (measured 1.56x - 1.84x).
    """
    config = dataclasses.replace(case_config(case, rng), init_std=0.02)
    model = randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
    params = flat_params(model)
    reference = reference_model(config, objective, to_hf_tensors(params, config, objective))
    ids, attention_mask = padded_batch(case["seq"], config.vocab_size, rng)
    real = attention_mask.astype(bool)
    torch_hidden, torch_logits = _torch_run(reference, ids, attention_mask, autocast=True)
    # The premise: torch autocast keeps the residual stream fp32 and returns bf16 logits.
    assert torch_hidden.dtype == torch.float32 and torch_logits.dtype == torch.bfloat16
    expected = {"hidden": torch_hidden.float().numpy(), "logits": torch_logits.float().numpy()}

    errors = {}
    for precision in ("autocast", "uniform"):
        ours = model_from_params(
            dataclasses.replace(config, precision=precision, dtype="bfloat16"), objective, params)
        batch = (jnp.asarray(ids), jnp.asarray(attention_mask, dtype=jnp.int32))
        actual = {"hidden": run_hidden(ours, *batch), "logits": run_logits(ours, *batch)}
        for name, value in actual.items():
            diff = np.abs(np.asarray(value, np.float32) - expected[name])[real]
            scale = np.abs(expected[name][real]).max()
            errors[precision, name] = (diff.max() / (BF16_EPS * scale), diff.mean())
    assert errors["autocast", "hidden"][0] <= 1 / 16, errors
    assert errors["uniform", "hidden"][0] >= 1 / 4, errors
    assert errors["autocast", "logits"][0] <= 1.0, errors
    assert errors["uniform", "logits"][1] >= 1.3 * errors["autocast", "logits"][1], errors
    assert np.abs(expected["logits"]).max() > 0.5  # not a comparison of near-zero arrays


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_key_map_round_trips_and_names_hf_tensors(objective, rng):
    config = small_config(num_layers=3)
    params = flat_params(randomized_model(config, objective, seed=int(rng.integers(1 << 30))))
    tensors = to_hf_tensors(params, config, objective)
    back = from_hf_tensors(tensors, config, objective)
    assert back.keys() == params.keys()
    for path, value in params.items():
        np.testing.assert_array_equal(back[path], value)
    h = config.hidden_size
    if objective == "mlm":
        wqkv = tensors["model.layers.1.attn.Wqkv.weight"]
        kernel = params[("layers", 1, "attn", "Wqkv", "kernel")]
        assert wqkv.shape == (3 * h, h)
        np.testing.assert_array_equal(wqkv[h:2 * h], kernel[:, 1, :].T)  # rows H..2H-1 are K
        assert "head.dense.weight" in tensors
    else:
        assert tensors["model.layers.1.attn.k_proj.weight"].shape == (h, h)
        assert "lm_head.dense.weight" in tensors and "model.layers.1.attn.Wqkv.weight" not in tensors
    assert "model.layers.0.attn_norm.weight" not in tensors
    with pytest.raises(ValueError, match="model.final_norm.weight"):
        from_hf_tensors({k: v for k, v in tensors.items() if k != "model.final_norm.weight"},
                        config, objective)
    with pytest.raises(ValueError, match="no name for parameters.*extra"):
        to_hf_tensors({**params, ("extra", "kernel"): params[("final_norm", "scale")]},
                      config, objective)
