"""Sequence classifiers (ettin_jax.models.classification) against transformers'
ModernBertForSequenceClassification / ModernBertDecoderForSequenceClassification (torch CPU,
eager attention, fp32, eval mode), through directories (ettin_jax.hf.classification) both ways,
with right-padded rows of varied lengths and weights that are neither the init nor zero."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    HF_CASES,
    case_config,
    randomized_model,
    small_config,
    transformers_config_fields,
)
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import (
    AutoModelForSequenceClassification,
    ModernBertDecoderForSequenceClassification,
    ModernBertForSequenceClassification,
)

from data_pipelines.special_tokens import PROJECT, SpecialTokens
from ettin_jax import hf
from ettin_jax.config.schema import MeshConfig
from ettin_jax.errors import CheckpointError
from ettin_jax.hf.classification import load_classifier, save_classifier
from ettin_jax.models import (
    EttinClassifier,
    HeadConfig,
    classifier_from_backbone,
    classifier_params,
    named_params,
)
from ettin_jax.models.classification import pool
from ettin_jax.models.layers import output_std
from ettin_jax.training.mesh import make_mesh, parameter_sharding

CLASSES = {"mlm": ModernBertForSequenceClassification,
           "clm": ModernBertDecoderForSequenceClassification}


@nnx.jit(static_argnames=("deterministic",))
def _logits(classifier, ids, mask, *, deterministic=True, dropout_rng=None):
    return classifier(ids, mask, deterministic=deterministic, dropout_rng=dropout_rng)


def _batch(seq: int, vocab_size: int, rng: np.random.Generator, pad: int):
    """Random ids [4, seq] that never hold `pad` or ids below 5 (special tokens), right-padded
    with `pad` to random lengths (one full row, one of 1 token); int64 mask, 1 on tokens."""
    lengths = np.concatenate([[seq, 1], rng.integers(2, seq, 2)])
    rng.shuffle(lengths)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, vocab_size, (4, seq)), pad)
    return ids, mask


def _perturbed(classifier: EttinClassifier, seed: int) -> EttinClassifier:
    """`classifier` with fresh-seed noise on every weight (norm scales and biases too, which
    init leaves 1 and 0): what fine-tuning would leave, not what init gives."""
    rng = np.random.default_rng(seed)
    state = nnx.state(classifier, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(var.get_value())
        scale = 0.2 if path[-1] in ("scale", "bias") else 0.5 * float(value.std())
        var.set_value(jnp.asarray(value + rng.normal(0.0, scale, value.shape), value.dtype))
    nnx.update(classifier, state)
    return classifier


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask)).logits.numpy()


def _assert_close(actual, expected, tol=1e-4):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= tol, np.abs(actual - expected).max()
    assert np.abs(expected).max() > 0.1  # not two near-zero arrays


EXPORT_CASES = [("mlm", "cls", 3), ("mlm", "mean", 1), ("clm", "last", 2), ("clm", "last", 1)]


@pytest.mark.parametrize("objective,pooling,num_labels", EXPORT_CASES,
                         ids=[f"{o}-{p}-{n}" for o, p, n in EXPORT_CASES])
def test_export_matches_transformers_and_imports_back(objective, pooling, num_labels, rng,
                                                      tmp_path):
    config = case_config(HF_CASES[0], rng)
    assert config.attention_output_dropout > 0  # eval must switch it off, here and in torch
    backbone = randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
    head = HeadConfig(num_labels, pooling, classifier_dropout=0.1)
    classifier = classifier_from_backbone(backbone, head,
                                          rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    classifier = _perturbed(classifier, seed=int(rng.integers(1 << 30)))
    special = SpecialTokens(pad=int(rng.integers(0, 5)), cls=5, sep=6)
    id2label = None if num_labels == 1 else {i: f"class-{i}" for i in range(num_labels)}
    save_classifier(classifier, tmp_path, special_tokens=special, id2label=id2label)

    reference, loading = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    reference.eval()
    assert type(reference) is CLASSES[objective]
    assert not any(loading.values()), loading  # every tensor read, none left to init
    assert reference.num_labels == num_labels
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["problem_type"] == ("regression" if num_labels == 1
                                       else "single_label_classification")
    assert written.get("classifier_pooling") == (pooling if objective == "mlm" else None)

    ids, mask = _batch(HF_CASES[0]["seq"], config.vocab_size, rng, special.pad)
    ours = _logits(classifier, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    _assert_close(ours, _torch_logits(reference, ids, mask))

    # Training mode: dropout is on, driven by the key alone.
    key = jax.random.key(int(rng.integers(1 << 30)))
    train = [_logits(classifier, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                     deterministic=False, dropout_rng=key) for _ in range(2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert np.abs(np.asarray(train[0]) - np.asarray(ours)).max() > 1e-3

    loaded, meta = load_classifier(tmp_path)
    assert loaded.head_config == head and loaded.objective == objective
    assert meta.special_tokens == special
    assert meta.id2label == (id2label or {0: "LABEL_0"})
    assert meta.problem_type == written["problem_type"]
    before, after = classifier_params(classifier), classifier_params(loaded)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
    np.testing.assert_array_equal(
        _logits(loaded, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)), ours)


def _transformers_classifier(config, objective, num_labels, rng, **fields):
    """A randomly initialised transformers classifier of `config`'s architecture, built from a
    hand-written config (not by ettin_jax), with random norm scales and classifier bias."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    hf_config = CLASSES[objective].config_class(
        **transformers_config_fields(config), initializer_range=config.init_std,
        num_labels=num_labels, **fields,
    )
    model = CLASSES[objective](hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("objective,pooling", [("mlm", "mean"), ("clm", "last")])
def test_import_of_transformers_save_pretrained(objective, pooling, rng, tmp_path):
    config = case_config(HF_CASES[0], rng)
    fields = {"classifier_pooling": pooling} if objective == "mlm" else {}
    reference = _transformers_classifier(config, objective, 3, rng, classifier_dropout=0.2,
                                         **fields)
    reference.save_pretrained(tmp_path)

    classifier, meta = load_classifier(tmp_path)
    assert classifier.objective == objective
    assert classifier.head_config == HeadConfig(3, pooling, classifier_dropout=0.2)
    assert meta.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert meta.problem_type == "single_label_classification"
    assert meta.special_tokens == SpecialTokens(pad=0, cls=1, sep=2)
    ids, mask = _batch(HF_CASES[0]["seq"], config.vocab_size, rng, pad=0)
    _assert_close(_logits(classifier, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)),
                  _torch_logits(reference, ids, mask))


def test_from_backbone_starts_as_transformers_from_pretrained(rng, tmp_path):
    """The encoder keeps its MLM head transform (transformers loads `head.*` from the export),
    the decoder's head and every classifier start fresh with transformers' init; backbones
    are the member's weights and the member is left whole."""
    config = small_config(num_layers=4)
    encoder = randomized_model(config, "mlm", seed=int(rng.integers(1 << 30)))
    hf.save_pretrained(encoder, tmp_path)
    transformers_start = AutoModelForSequenceClassification.from_pretrained(tmp_path,
                                                                            num_labels=5)
    classifier = classifier_from_backbone(encoder, HeadConfig(5, "cls"),
                                          rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    np.testing.assert_array_equal(
        np.asarray(classifier.head.dense.kernel[...]).T,
        transformers_start.head.dense.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(classifier.head.norm.scale[...]),
                                  transformers_start.head.norm.weight.detach().numpy())
    assert encoder.head is not None and encoder.decoder_bias is not None
    member = named_params(encoder)
    for path, value in classifier_params(classifier).items():
        if path[0] == "backbone":
            np.testing.assert_array_equal(value, member[path[1:]])

    decoder = randomized_model(config, "clm", seed=int(rng.integers(1 << 30)))
    fresh = classifier_from_backbone(decoder, HeadConfig(5, "last"),
                                     rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    dense = np.asarray(fresh.head.dense.kernel[...])
    std = output_std(config)
    assert np.abs(dense).max() <= 2 * std and 0.8 * std < dense.std() < 0.95 * std
    np.testing.assert_array_equal(np.asarray(fresh.head.norm.scale[...]), 1.0)
    weights = np.asarray(fresh.classifier.kernel[...])
    std = config.hidden_size ** -0.5
    assert np.abs(weights).max() <= 2 * std and 0.75 * std < weights.std() < 1.0 * std
    assert fresh.classifier.bias is None  # transformers' decoder classifier has no bias
    np.testing.assert_array_equal(np.asarray(classifier.classifier.bias[...]), 0.0)


def test_pooling_matches_numpy(rng):
    hidden = rng.normal(size=(5, 9, 4)).astype(np.float32)
    lengths = np.array([9, 1, 4, 0, 7])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    hidden[mask == 0] = np.nan  # padding must not leak in
    np.testing.assert_array_equal(pool(jnp.asarray(hidden), jnp.asarray(mask), "cls"),
                                  hidden[:, 0])
    last = pool(jnp.asarray(hidden), jnp.asarray(mask), "last")
    for row, length in enumerate(lengths):
        expected = hidden[row, max(length - 1, 0)]
        np.testing.assert_array_equal(last[row], expected)
    mean = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), "mean"))
    for row, length in enumerate(lengths):
        expected = hidden[row, :length].mean(0) if length else np.zeros(4)
        np.testing.assert_allclose(mean[row], expected, rtol=1e-6, atol=1e-7)
    left = np.asarray(mask[:, ::-1])  # left padding: the last token is still the last position
    np.testing.assert_array_equal(pool(jnp.asarray(hidden[:, ::-1]), jnp.asarray(left),
                                       "last")[lengths > 0], hidden[lengths > 0, 0])


def test_classifier_runs_sharded_with_the_backbones_axes(rng):
    config = small_config(num_layers=2)
    classifier = EttinClassifier(config, "clm", HeadConfig(3, "mean"),
                                 rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    classifier = _perturbed(classifier, seed=int(rng.integers(1 << 30)))
    ids, mask = _batch(16, config.vocab_size, rng, pad=0)
    ids, mask = jnp.asarray(np.tile(ids, (2, 1)), jnp.int32), jnp.asarray(np.tile(mask, (2, 1)))
    expected = _logits(classifier, ids, mask)

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    graphdef, state = nnx.split(classifier)
    specs = nnx.get_partition_spec(state)
    flat_specs = dict(nnx.to_flat_state(specs))
    assert flat_specs[("classifier", "kernel")].get_value() == P("embed", "labels")
    assert flat_specs[("head", "dense", "kernel")].get_value() == P("embed", "mlp")
    shardings = jax.tree.map(
        lambda spec, value: parameter_sharding(mesh, spec, value.shape, "p"),
        nnx.to_pure_dict(specs), nnx.to_pure_dict(state),
        is_leaf=lambda x: isinstance(x, P))
    for path, value in nnx.to_flat_state(state):
        assert len(flat_specs[path].get_value()) == value.get_value().ndim, path
    placed = jax.device_put(nnx.to_pure_dict(state), shardings)
    assert placed["classifier"]["kernel"].sharding.spec == P("fsdp", None)
    nnx.replace_by_pure_dict(state, placed)
    sharded = nnx.merge(graphdef, state)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    got = _logits(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_heads_and_directories_are_named(rng, tmp_path):
    config = small_config(num_layers=1)
    with pytest.raises(ValueError, match="num_labels"):
        HeadConfig(0, "cls")
    with pytest.raises(ValueError, match="pooling 'last' is not supported by the encoder"):
        EttinClassifier(config, "mlm", HeadConfig(2, "last"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling 'cls' is not supported by the decoder"):
        EttinClassifier(config, "clm", HeadConfig(2, "cls"), rngs=nnx.Rngs(0))
    decoder_mean = EttinClassifier(config, "clm", HeadConfig(2, "mean"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot be exported"):
        save_classifier(decoder_mean, tmp_path / "mean")
    classifier = EttinClassifier(config, "mlm", HeadConfig(2, "cls"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="id2label"):
        save_classifier(classifier, tmp_path / "labels", id2label={0: "a", 2: "b"})
    with pytest.raises(ValueError, match="attention_mask must hold only"):
        classifier(jnp.ones((1, 4), jnp.int32) * 7, jnp.full((1, 4), 2, jnp.int32))

    hf.save_pretrained(randomized_model(config, "mlm", seed=1), tmp_path / "member")
    with pytest.raises(CheckpointError, match="architectures.*not a sequence classifier"):
        load_classifier(tmp_path / "member")
    save_classifier(classifier, tmp_path / "ok", special_tokens=PROJECT)
    written = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**written, "classifier_bias": True}))
    with pytest.raises(CheckpointError, match="classifier_bias"):
        load_classifier(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(
        {**written, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(CheckpointError, match="classifier.weight has shape"):
        load_classifier(tmp_path / "ok")


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_text_pairs_through_the_exported_tokenizer_give_our_logits(objective, tokenizer_dir,
                                                                   rng, tmp_path):
    """transformers' AutoTokenizer of the export brackets and pads text pairs as ettin-jax
    does, and the transformers classifier on its output gives our logits."""
    from transformers import AutoTokenizer

    from data_pipelines.special_tokens import with_special_tokens
    from data_pipelines.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    specials = tokenizer.special_tokens
    config = case_config(HF_CASES[0], rng)
    pooling = "cls" if objective == "mlm" else "last"
    classifier = _perturbed(classifier_from_backbone(
        randomized_model(config, objective, seed=int(rng.integers(1 << 30))),
        HeadConfig(2, pooling), rngs=nnx.Rngs(int(rng.integers(1 << 30)))),
        seed=int(rng.integers(1 << 30)))
    save_classifier(classifier, tmp_path, special_tokens=specials, tokenizer_dir=tokenizer_dir)

    words = "the king is dead long live the queen of all that is".split()
    pairs = [(" ".join(rng.choice(words, rng.integers(1, 6))),
              " ".join(rng.choice(words, rng.integers(1, 6)))) for _ in range(3)]
    rows = [with_special_tokens(tokenizer.encode(a), tokenizer.encode(b), specials,
                                objective=objective) for a, b in pairs]
    seq = max(map(len, rows))
    ids = np.full((len(rows), seq), specials.pad, np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1

    encoded = AutoTokenizer.from_pretrained(tmp_path)(
        [a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="np")
    np.testing.assert_array_equal(encoded["input_ids"], ids)
    np.testing.assert_array_equal(encoded["attention_mask"], mask)
    reference = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    _assert_close(_logits(classifier, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)),
                  _torch_logits(reference, ids, mask))
