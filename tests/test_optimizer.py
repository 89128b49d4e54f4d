"""StableAdamW and AdamW against plain numpy references; schedules against their formulas."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ettin_jax.config.schema import OptimizerConfig, ScheduleConfig
from ettin_jax.training.optimizer import make_optimizer, set_learning_rate
from ettin_jax.training.schedules import learning_rate_schedule


def _reference_stable_adamw(params, grads_per_step, lrs, *, peak, b1, b2, eps, wd):
    """StableAdamW as ../shared/ettin_reference.md states it, one tensor at a time."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for k in params:
            g = grads[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            rms = np.sqrt(np.mean(g * g / np.maximum(v_hat, eps * eps)))
            step_lr = lr / max(1.0, rms)
            if params[k].ndim > 1:
                params[k] = params[k] * (1 - (lr / peak) * wd)
            params[k] = params[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def _run(optimizer, params, grads_per_step, lrs):
    state = optimizer.init(params)
    for grads, lr in zip(grads_per_step, lrs):
        state = set_learning_rate(state, lr)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _problem(rng, steps=6):
    params = {"w": rng.normal(size=(5, 7)).astype(np.float32),
              "scale": rng.normal(size=(7,)).astype(np.float32)}
    # Large early gradients make the update clipping (rms > 1) kick in.
    grads = [{k: (rng.normal(size=p.shape) * (30.0 if t == 3 else 1.0)).astype(np.float32)
              for k, p in params.items()} for t in range(steps)]
    lrs = list(rng.uniform(1e-3, 3e-3, steps))
    return params, grads, lrs


def test_stable_adamw_matches_the_reference(rng):
    config = OptimizerConfig(name="stable_adamw", learning_rate=3e-3, weight_decay=0.1,
                             b1=0.9, b2=0.98, eps=1e-6)
    params, grads, lrs = _problem(rng)
    ours = _run(make_optimizer(config), params, grads, lrs)
    expected = _reference_stable_adamw(params, grads, lrs, peak=3e-3, b1=0.9, b2=0.98,
                                       eps=1e-6, wd=0.1)
    for key in params:
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-5, atol=1e-6)
    # The norm scale (ndim 1) is not decayed; with zero gradients only decay would move it.
    zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 2
    still = _run(make_optimizer(config), params, zeros, [3e-3, 3e-3])
    np.testing.assert_array_equal(still["scale"], params["scale"])
    assert not np.allclose(still["w"], params["w"])


def test_adamw_matches_optax_adamw(rng):
    config = OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.01, eps=1e-6)
    params, grads, _ = _problem(rng)
    ours = _run(make_optimizer(config), params, grads, [1e-3] * len(grads))
    reference = optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
                            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    state, expected = reference.init(params), params
    for g in grads:
        updates, state = reference.update(g, state, expected)
        expected = optax.apply_updates(expected, updates)
    for key in params:
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-6, atol=1e-7)


def test_global_norm_clipping(rng):
    config = OptimizerConfig(name="adamw", learning_rate=1e-3, clip_grad_norm=0.5)
    params, grads, _ = _problem(rng, steps=1)
    big = {k: g * 100 for k, g in grads[0].items()}
    clipped = _run(make_optimizer(config), params, [big], [1e-3])
    scaled = _run(make_optimizer(config), params, [{k: g * 3 for k, g in big.items()}], [1e-3])
    for key in params:  # after clipping, the gradient's scale no longer matters
        np.testing.assert_allclose(clipped[key], scaled[key], rtol=1e-5)


@pytest.mark.parametrize("decay", ["1-sqrt", "linear"])
def test_warmup_stable_decay(decay):
    config = ScheduleConfig(kind="warmup_stable_decay", warmup_tokens=100, decay=decay,
                            decay_tokens=400, floor=0.02)
    lr = learning_rate_schedule(config, peak=1.0, total_tokens=1000)
    assert float(lr(0)) == pytest.approx(1 / 100)
    assert float(lr(49)) == pytest.approx(0.5)
    assert float(lr(300)) == pytest.approx(1.0) == float(lr(600))
    progress = 0.25
    shape = np.sqrt(progress) if decay == "1-sqrt" else progress
    assert float(lr(700)) == pytest.approx(0.02 + 0.98 * (1 - shape), rel=1e-6)
    assert float(lr(1000)) == pytest.approx(0.02) == float(lr(5000))
    # Ettin's decay phase: restart at 0.5 x peak, 1 - sqrt down to 0.02 x peak.
    restart = learning_rate_schedule(dataclasses.replace(config, start=0.5), peak=2.0,
                                     total_tokens=1000)
    assert float(restart(300)) == pytest.approx(1.0)
    assert float(restart(700)) == pytest.approx(2.0 * (0.02 + 0.48 * (1 - shape)), rel=1e-6)
    assert float(restart(1000)) == pytest.approx(0.04)
    constant = learning_rate_schedule(ScheduleConfig(kind="constant", start=0.5), peak=3.0,
                                      total_tokens=10)
    assert float(constant(7)) == pytest.approx(1.5)
    assert isinstance(lr(jnp.asarray(5)), jax.Array)
