"""The layer stack as a scan over repeating groups (`ModelConfig.scan_layers`) against the
unrolled loop: the same parameters, the same dropout keys, the same results."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ettin_jax.models.transformer as transformer
from ettin_jax.models import EttinModel, get_preset
from ettin_jax.models.transformer import LayerScan, layer_scan
from conftest import small_config


def test_the_ettin_pattern_scans_after_layer_zero():
    def scanned(config):
        return layer_scan(dataclasses.replace(config, scan_layers=True))

    assert scanned(get_preset("ettin-150m")) == LayerScan(start=1, period=3, groups=7)
    assert scanned(get_preset("ettin-1b")) == LayerScan(start=1, period=3, groups=9)
    # 8 layers: 0 | (local, local, global) x 2 | 7 unrolled after the last whole group.
    assert scanned(small_config(num_layers=8)) == LayerScan(start=1, period=3, groups=2)
    assert layer_scan(small_config(num_layers=8)) is None  # off by default
    assert scanned(small_config(num_layers=2)) is None  # nothing repeats
    assert scanned(small_config(num_layers=3)) == LayerScan(start=1, period=1, groups=2)
    # An explicit list that does not repeat runs unrolled; one that does is scanned.
    assert scanned(small_config(num_layers=6, global_layers=(1, 4))) is None
    assert scanned(small_config(num_layers=7, global_layers=(2, 4, 6))) == LayerScan(
        start=1, period=2, groups=3)


def _loss_and_grads(config, objective, params, ids, segments):
    graph = nnx.graphdef(EttinModel(config, objective, rngs=nnx.Rngs(0)))

    @jax.jit
    def run(params):
        def loss(params):
            model = nnx.merge(graph, params)
            hidden = model(ids, segments, deterministic=False, dropout_rng=jax.random.key(7))
            logits = model.logits(hidden).astype(jnp.float32)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]) + jnp.mean(hidden)
        return jax.value_and_grad(loss)(params)

    value, grads = run(params)
    return np.asarray(value), {path: np.asarray(v.get_value())
                               for path, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("objective,precision", [("mlm", "autocast"), ("clm", "uniform")])
def test_scan_gives_the_unrolled_loss_and_gradients(objective, precision, rng, monkeypatch):
    """Dropout on, packed documents and padding, 6 layers, every second one global (layer 0,
    then (local, global) x 2 scanned, then layer 5 unrolled). The scan program unrolled by
    XLA gives the unrolled stack's
    loss and gradients bit for bit: the same layers in the same order with the same dropout
    keys. Compiled as a loop (the default), the loss is still bit-identical; the gradients
    differ in the last bits, because XLA:CPU fuses (and contracts into FMAs) a loop body's
    backward pass differently from straight-line code."""
    dtype = "float32" if precision == "uniform" else "bfloat16"
    config = small_config(num_layers=6, global_attn_every_n_layers=2, scan_layers=True,
                          attention_output_dropout=0.2, precision=precision, dtype=dtype)
    assert layer_scan(config) == LayerScan(start=1, period=2, groups=2)
    model = EttinModel(config, objective, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    params = nnx.state(model)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 2]], 4, axis=1))

    unrolled = _loss_and_grads(dataclasses.replace(config, scan_layers=False), objective,
                               params, ids, segments)
    rolled = _loss_and_grads(config, objective, params, ids, segments)
    monkeypatch.setattr(transformer, "_SCAN_UNROLL", True)
    scan_unrolled = _loss_and_grads(config, objective, params, ids, segments)

    np.testing.assert_array_equal(scan_unrolled[0], unrolled[0])
    np.testing.assert_array_equal(rolled[0], unrolled[0])
    assert scan_unrolled[1].keys() == unrolled[1].keys() == rolled[1].keys()
    tolerance = 1e-5 if precision == "uniform" else 3e-3  # of the leaf's largest gradient
    for path, want in unrolled[1].items():
        np.testing.assert_array_equal(scan_unrolled[1][path], want, err_msg=str(path))
        np.testing.assert_allclose(rolled[1][path], want, rtol=0,
                                   atol=tolerance * np.abs(want).max(), err_msg=str(path))


def test_scan_keeps_the_parameters_per_layer():
    """Checkpoints and the HuggingFace key map see ("layers", i, ...) either way."""
    config = small_config(num_layers=8, scan_layers=True)
    scanned = nnx.state(EttinModel(config, "mlm", rngs=nnx.Rngs(0)))
    unrolled = nnx.state(EttinModel(dataclasses.replace(config, scan_layers=False), "mlm",
                                    rngs=nnx.Rngs(0)))
    paths = [path for path, _ in nnx.to_flat_state(scanned)]
    assert paths == [path for path, _ in nnx.to_flat_state(unrolled)]
    assert ("layers", 7, "attn", "Wqkv", "kernel") in paths
