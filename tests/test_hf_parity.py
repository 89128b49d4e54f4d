"""The model against an independent reference: transformers' ModernBERT classes (torch, CPU,
eager attention, fp32), through the one key map in ettin_jax.hf.keymap."""

from __future__ import annotations

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


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_logits_match_transformers(objective, case, rng):
    config = case_config(case, rng)
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
