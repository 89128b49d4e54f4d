"""HuggingFace interchange through directories, as users use it: export -> transformers,
transformers -> import, cross-objective conversion, native checkpoints, the CLI and bad input.
The reference is transformers' ModernBERT classes (torch CPU, eager attention, fp32)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

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
    transformers_config_fields,
)
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
)

from data_pipelines.special_tokens import MODERNBERT, SpecialTokens
from ettin_jax import hf
from ettin_jax.cli import main
from ettin_jax.errors import CheckpointError
from ettin_jax.hf.config import from_hf_config
from ettin_jax.hf.keymap import to_hf_tensors
from ettin_jax.hf.transfer import convert_objective, export_checkpoint, import_pretrained
from ettin_jax.models import with_objective
from ettin_jax.training.checkpoint import find_members, restore_weights, save_weights

AUTO = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM}
CLASSES = {"mlm": ModernBertForMaskedLM, "clm": ModernBertDecoderForCausalLM}


def _torch_logits(model, ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(attention_mask)).logits.numpy()


def _assert_close(actual, expected, attention_mask):
    real = attention_mask.astype(bool)
    assert np.abs(np.asarray(actual) - expected)[real].max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # not two near-zero arrays


def _load_in_transformers(path, objective):
    model = AUTO[objective].from_pretrained(path, attn_implementation="eager").eval()
    assert type(model) is CLASSES[objective]
    return model


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_export_loads_in_transformers_with_equal_logits(objective, case, rng, tmp_path):
    config = case_config(case, rng)
    model = randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
    report = hf.save_pretrained(model, tmp_path)
    assert report.elements == report.model_params == sum(v.size for v in flat_params(model).values())

    reference = _load_in_transformers(tmp_path, objective)
    ids, attention_mask = padded_batch(case["seq"], config.vocab_size, rng)
    expected = _torch_logits(reference, ids, attention_mask)
    _assert_close(hf.PretrainedModel(model, MODERNBERT)(ids, attention_mask), expected,
                  attention_mask)

    written = json.loads((tmp_path / "config.json").read_text())
    assert written["layer_types"] == reference.config.layer_types
    assert written["classifier_activation"] == "gelu"
    assert written["rope_parameters"]["full_attention"]["rope_theta"] == config.global_rope_theta
    assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == config.local_rope_theta


def _random_transformers_model(config, objective, rng):
    """A transformers model of `config`'s architecture with random weights, norm scales and
    decoder bias, built from a config.json written by hand (not by ettin_jax)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    hf_config = CLASSES[objective].config_class(
        **transformers_config_fields(config))
    model = CLASSES[objective](hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name == "decoder.bias":
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("case", HF_CASES, ids=case_id)
def test_import_from_transformers_gives_equal_logits(objective, case, rng, tmp_path):
    config = case_config(case, rng)
    reference = _random_transformers_model(config, objective, rng)
    reference.save_pretrained(tmp_path)

    imported = hf.from_pretrained(tmp_path)
    assert imported.objective == objective
    assert imported.model.config.layer_types == config.layer_types
    assert imported.special_tokens == SpecialTokens(pad=0, cls=1, sep=2)
    ids, attention_mask = padded_batch(case["seq"], config.vocab_size, rng)
    _assert_close(imported(ids, attention_mask), _torch_logits(reference, ids, attention_mask),
                  attention_mask)


def test_import_reads_sharded_bf16_checkpoints(rng, tmp_path):
    config = case_config(HF_CASES[1], rng)
    reference = _random_transformers_model(config, "clm", rng)
    reference.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    imported = hf.from_pretrained(tmp_path)
    assert all(v.dtype == np.float32 for v in flat_params(imported.model).values())
    ids, attention_mask = padded_batch(37, config.vocab_size, rng)
    _assert_close(imported(ids, attention_mask),
                  _torch_logits(reference.to(torch.float32), ids, attention_mask), attention_mask)


def test_decoder_converts_to_an_encoder_and_back(rng, tmp_path):
    config = case_config(HF_CASES[1], rng)
    decoder = randomized_model(config, "clm", seed=int(rng.integers(1 << 30)))
    hf.save_pretrained(decoder, tmp_path / "decoder", special_tokens=MODERNBERT.__class__(
        pad=5, cls=6, sep=7))
    convert_objective(tmp_path / "decoder", tmp_path / "encoder", to="encoder")

    reference = _load_in_transformers(tmp_path / "encoder", "mlm")
    assert reference.config.pad_token_id == 5
    ids, attention_mask = padded_batch(37, config.vocab_size, rng)
    encoder = with_objective(decoder, "mlm")
    _assert_close(hf.PretrainedModel(encoder, MODERNBERT)(ids, attention_mask),
                  _torch_logits(reference, ids, attention_mask), attention_mask)

    convert_objective(tmp_path / "encoder", tmp_path / "again", to="decoder")
    original = load_file(tmp_path / "decoder" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == again.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], again[name])
    with pytest.raises(CheckpointError, match="already holds an decoder"):
        convert_objective(tmp_path / "again", tmp_path / "x", to="decoder")


def test_native_checkpoints_import_export_and_convert(rng, tmp_path):
    """HF dir -> native checkpoint -> HF dir keeps every tensor bit for bit; run directories
    export both members; the CLI does the same."""
    config = case_config(HF_CASES[0], rng)
    encoder = randomized_model(config, "mlm", seed=int(rng.integers(1 << 30)))
    hf.save_pretrained(encoder, tmp_path / "hf")
    step_dir = import_pretrained(tmp_path / "hf", tmp_path / "native")
    assert step_dir == tmp_path / "native" / "checkpoints" / "0"

    restored = restore_weights(tmp_path / "native")
    assert restored.model.objective == "mlm"
    # HF has no preset, and exports carry no dropout (attention_dropout 0.0).
    assert restored.model.config == dataclasses.replace(encoder.config, preset=None,
                                                        attention_output_dropout=0.0)
    for path, value in flat_params(encoder).items():
        np.testing.assert_array_equal(flat_params(restored.model)[path], value)

    # A run directory: encoder/ and decoder/ side by side, each with its own steps.
    run = tmp_path / "run"
    save_weights(run / "encoder", encoder, special_tokens=restored.special_tokens, step=3)
    save_weights(run / "decoder", with_objective(encoder, "clm"),
                 special_tokens=restored.special_tokens, step=3)
    assert set(find_members(run)) == {"encoder", "decoder"}
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    for member, objective in (("encoder", "mlm"), ("decoder", "clm")):
        _load_in_transformers(tmp_path / "exported" / member, objective)
    first = load_file(tmp_path / "hf" / "model.safetensors")
    second = load_file(tmp_path / "exported" / "encoder" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "cli-native")]) == 0
    assert main(["convert", str(tmp_path / "cli-native"), "--to", "decoder",
                 "--out", str(tmp_path / "cli-decoder")]) == 0
    assert restore_weights(tmp_path / "cli-decoder").model.objective == "clm"
    assert main(["export", str(tmp_path / "cli-decoder" / "checkpoints" / "0"),
                 "--out", str(tmp_path / "cli-hf")]) == 0
    _load_in_transformers(tmp_path / "cli-hf", "clm")


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_export_writes_attention_dropout_zero(objective, rng, tmp_path):
    """A model trained with dropout 0.1 after the attention output projection exports
    attention_dropout 0.0 (transformers would also drop attention probabilities with it):
    transformers loads it and, even in train mode, drops nothing; re-imported, it has no
    dropout."""
    config = dataclasses.replace(case_config(HF_CASES[0], rng), attention_output_dropout=0.1)
    hf.save_pretrained(randomized_model(config, objective, seed=int(rng.integers(1 << 30))),
                       tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_dropout"] == 0.0

    reference = _load_in_transformers(tmp_path, objective)
    assert reference.config.attention_dropout == 0.0
    ids, attention_mask = padded_batch(HF_CASES[0]["seq"], config.vocab_size, rng)
    reference.train()
    torch.manual_seed(0)
    first = _torch_logits(reference, ids, attention_mask)
    np.testing.assert_array_equal(_torch_logits(reference, ids, attention_mask), first)

    assert hf.from_pretrained(tmp_path).model.config.attention_output_dropout == 0.0


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(20)]])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))


def test_tokenizer_files_travel_with_the_model(rng, tmp_path):
    model = randomized_model(case_config(HF_CASES[0], rng), "clm", seed=1)
    write_tokenizer(tmp_path / "tok")
    report = hf.save_pretrained(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert report.tokenizer_files == ("tokenizer.json", "tokenizer_config.json",
                                      "special_tokens_map.json")
    imported = hf.from_pretrained(tmp_path / "hf")
    assert (imported.special_tokens.mask, imported.special_tokens.unk) == (4, 1)
    import_pretrained(tmp_path / "hf", tmp_path / "native")
    assert (tmp_path / "native" / "tokenizer" / "tokenizer.json").is_file()
    export_checkpoint(tmp_path / "native", tmp_path / "again")
    # The vocabulary travels unchanged; the export adds the decoder's post-processor, the same
    # after a round trip through a native checkpoint.
    again, first = (json.loads((tmp_path / d / "tokenizer.json").read_text())
                    for d in ("again", "hf"))
    assert again == first
    assert first["model"] == json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]
    assert first["post_processor"]["type"] == "TemplateProcessing"


def test_released_modernbert_config_fields_are_read():
    """A config.json in the form released ModernBERT/Ettin checkpoints use (older field names,
    no layer_types, no rope_parameters)."""
    released = {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
        "vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152,
        "num_hidden_layers": 22, "num_attention_heads": 12, "global_attn_every_n_layers": 3,
        "local_attention": 128, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
        "hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": 1e-05,
        "attention_dropout": 0.0, "pad_token_id": 50283, "bos_token_id": 50281,
        "eos_token_id": 50282, "cls_token_id": 50281, "sep_token_id": 50282,
        "torch_dtype": "float32", "transformers_version": "4.48.0",
    }
    config, objective, special = from_hf_config(released, source="config.json")
    assert objective == "mlm" and special == MODERNBERT
    assert config.layer_types[:4] == ("global", "local", "local", "global")
    assert (config.global_rope_theta, config.local_rope_theta) == (160000.0, 10000.0)
    assert (config.num_layers, config.hidden_size, config.local_attention) == (22, 768, 128)
    decoder = {**released, "model_type": "modernbert-decoder", "local_attention": None,
               "sliding_window": 64}
    assert from_hf_config(decoder, source="config.json")[0].local_attention == 128


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small exported encoder directory that bad-input tests copy and break."""
    path = tmp_path_factory.mktemp("exported")
    model = randomized_model(case_config(HF_CASES[0], np.random.default_rng(7)), "mlm", seed=7)
    hf.save_pretrained(model, path)
    return path


def _broken_copy(exported, tmp_path, *, config=None, tensors=None):
    target = tmp_path / "broken"
    shutil.copytree(exported, target)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config(data)))
    if tensors is not None:
        data = load_file(target / "model.safetensors")
        save_file(tensors(data), target / "model.safetensors", {"format": "pt"})
    return target


def _without(data, name):
    return {k: v for k, v in data.items() if k != name}


@pytest.mark.parametrize("break_config, break_tensors, expected", [
    (lambda c: {**c, "model_type": "bert"}, None, ["model_type", "'bert'", "modernbert"]),
    (lambda c: {**c, "hidden_activation": "relu"}, None, ["hidden_activation", "'relu'"]),
    (lambda c: {**c, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}}, None,
     ["rope_type", "'yarn'"]),
    (lambda c: {**c, "layer_types": ["full_attention"]}, None, ["layer_types", "2 layer types"]),
    (lambda c: {**c, "num_attention_heads": 3}, None, ["config.json", "num_heads 3"]),
    (None, lambda t: _without(t, "model.final_norm.weight"),
     ["missing tensors ['model.final_norm.weight']"]),
    (None, lambda t: {**t, "classifier.weight": t["model.final_norm.weight"]},
     ["unexpected tensors ['classifier.weight']"]),
    (None, lambda t: {**t, "head.dense.weight": t["head.dense.weight"][:, :64].copy()},
     ["tensor head.dense.weight has shape (128, 64)", "implies (128, 128)"]),
    (None, lambda t: {**t, "decoder.weight": t["model.embeddings.tok_embeddings.weight"] + 1},
     ["decoder.weight differs", "untied"]),
    (lambda c: {**c, "hidden_size": 256, "num_attention_heads": 4}, None,
     ["model.embeddings.tok_embeddings.weight", "(1024, 128)", "(1024, 256)"]),
])
def test_bad_hf_directories_are_named(exported, tmp_path, break_config, break_tensors, expected):
    broken = _broken_copy(exported, tmp_path, config=break_config, tensors=break_tensors)
    with pytest.raises(CheckpointError) as info:
        hf.from_pretrained(broken)
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_not_a_checkpoint(exported, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a directory"):
        hf.from_pretrained(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.from_pretrained(tmp_path)
    broken = _broken_copy(exported, tmp_path)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        hf.from_pretrained(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        hf.from_pretrained(broken)
    assert main(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="o does not exist; train the pair first"):
        find_members(tmp_path / "o")
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        find_members(tmp_path / "o")


def test_incomplete_native_step_is_never_taken(exported, tmp_path):
    import_pretrained(exported, tmp_path / "native")
    checkpoints = tmp_path / "native" / "checkpoints"
    # What a process killed while saving step 5 leaves: orbax's temporary directory.
    shutil.copytree(checkpoints / "0", checkpoints / "5.orbax-checkpoint-tmp-123")
    assert restore_weights(tmp_path / "native").step == 0
    with pytest.raises(CheckpointError, match="no complete step 5; complete steps: \\[0\\]"):
        restore_weights(tmp_path / "native", step=5)
    with pytest.raises(CheckpointError, match="already exists"):
        import_pretrained(exported, tmp_path / "native")


def test_export_refuses_to_drop_a_parameter(rng):
    model = randomized_model(case_config(HF_CASES[0], rng), "mlm", seed=2)
    params = {**flat_params(model), ("layers", 0, "attn_norm", "scale"): np.ones(128)}
    with pytest.raises(ValueError, match="no name for parameters \\['layers.0.attn_norm.scale'\\]"):
        to_hf_tensors(params, model.config, "mlm")
