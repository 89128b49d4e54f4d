"""StableAdamW against optimi's own StableAdamW (torch), AdamW against optax's; schedules
against their formulas."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimi
import pytest
import torch

from ettin_jax.config.schema import OptimizerConfig, ScheduleConfig
from ettin_jax.training.optimizer import make_optimizer, set_learning_rate
from ettin_jax.training.schedules import learning_rate_schedule

B1, B2, EPS = 0.9, 0.98, 1e-6


def _run(optimizer, params, grads_per_step, lrs):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for grads, lr in zip(grads_per_step, lrs):
        state = set_learning_rate(state, lr)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _run_optimi(params, grads_per_step, lrs, *, max_lr, wd):
    """optimi's StableAdamW as Ettin built it (bert24: decouple_lr=True, constructor lr = peak;
    parameters with ndim <= 1 in a group without decay), the lr of each step set on the groups."""
    tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    groups = [{"params": [t for t in tensors.values() if t.ndim > 1]},
              {"params": [t for t in tensors.values() if t.ndim <= 1], "weight_decay": 0.0}]
    optimizer = optimi.StableAdamW(groups, lr=max_lr, betas=(B1, B2), eps=EPS,
                                   weight_decay=wd, decouple_lr=True)
    for grads, lr in zip(grads_per_step, lrs):
        for key, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[key])
        for group in optimizer.param_groups:
            group["lr"] = float(lr)  # max_lr stays the constructor's lr
        optimizer.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def _update_rms(grads_per_step):
    """RMS = sqrt(mean(g^2 / max(v_hat, eps^2))) of every tensor at every step (float64): the
    update is clipped where it exceeds 1."""
    v = {k: 0.0 for k in grads_per_step[0]}
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        row = {}
        for k, g in grads.items():
            g = g.astype(np.float64)
            v[k] = B2 * v[k] + (1 - B2) * g * g
            row[k] = float(np.sqrt(np.mean(g * g / np.maximum(v[k] / (1 - B2 ** t), EPS ** 2))))
        out.append(row)
    return out


def _problem(rng, steps=40):
    """Matrices, a 3-D tensor and 1-D tensors; random gradients (never zero), some of them 30x
    larger at some steps so that update clipping fires there."""
    shapes = {"w": (5, 7), "emb": (11, 4), "qkv": (3, 4, 6), "scale": (7,), "bias": (11,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    spikes = {(3, "w"), (3, "scale"), (11, "emb"), (17, "qkv"), (17, "w"), (25, "bias"),
              (30, "emb")}
    grads = [{k: (rng.normal(size=p.shape) * (30.0 if (t, k) in spikes else 1.0)
                  ).astype(np.float32) for k, p in params.items()} for t in range(steps)]
    return params, grads


def _lrs(kind, peak, steps, rng):
    if kind == "random":  # a new lr every step, at most the peak
        return [float(x) for x in rng.uniform(0.2, 1.0, steps) * peak]
    # Linear warmup over 10 steps, then 1 - sqrt decay to 0.02 x peak: the first step's lr
    # (peak / 10) is not optimi's max_lr.
    t = np.arange(steps, dtype=np.float64)
    decay = 0.02 + 0.98 * (1 - np.sqrt(np.clip((t - 9) / (steps - 10), 0, 1)))
    return [float(x) for x in np.where(t < 10, (t + 1) / 10, decay) * peak]


# A large decay makes its effect plain; optimi warns about such values.
@pytest.mark.filterwarnings("ignore:You are using weight_decay up to:UserWarning")
@pytest.mark.parametrize("schedule", ["random", "warmup"])
def test_stable_adamw_matches_optimi(rng, schedule):
    peak, wd, steps = 1e-2, 0.05, 40
    config = OptimizerConfig(name="stable_adamw", learning_rate=peak, weight_decay=wd,
                             b1=B1, b2=B2, eps=EPS)
    params, grads = _problem(rng, steps)
    lrs = _lrs(schedule, peak, steps, rng)
    assert len(set(lrs)) == steps and lrs[0] < peak

    # Update clipping fires on some tensors in some steps (decayed and undecayed ones), and
    # not everywhere: the clip factor is what the decay must share with the step.
    rms = _update_rms(grads)
    clipped = {(t, k) for t, row in enumerate(rms) for k, r in row.items() if r > 1.5}
    assert {"w", "emb", "qkv", "scale", "bias"} <= {k for _, k in clipped}
    assert sum(r <= 1.0 + 1e-6 for row in rms for r in row.values()) > len(clipped)

    ours = _run(make_optimizer(config), params, grads, lrs)
    expected = _run_optimi(params, grads, lrs, max_lr=peak, wd=wd)
    for key in params:
        assert ours[key].dtype == np.float32
        assert not np.allclose(expected[key], params[key], rtol=1e-3)  # it moved
        # Both run in fp32 with differently ordered roundings (optimi folds the bias
        # correction into its betas and decays in a separate multiply); each stays within a
        # few ulps of a float64 evaluation. atol 1e-7 (1e-7 of the parameters' N(0, 1) scale)
        # is for the few entries that end near zero: they keep the absolute rounding error
        # (~1e-8) of the larger values they passed through, so their relative error says
        # nothing. Over 80 seeds the largest excess over rtol 1e-6 was 4e-8.
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-6, atol=1e-7,
                                   err_msg=f"{key} ({schedule})")


def test_stable_adamw_state_follows_the_parameters(rng):
    config = OptimizerConfig(name="stable_adamw", learning_rate=3e-3, weight_decay=0.1)
    params, _ = _problem(rng, steps=1)
    optimizer = make_optimizer(config)
    state = optimizer.init(params)
    shapes = optax.tree_map_params(optimizer, lambda p: str(p.shape), state,
                                   transform_non_params=lambda _: None)
    moments = [leaf for leaf in jax.tree.leaves(shapes) if leaf is not None]
    assert sorted(moments) == sorted([str(p.shape) for p in params.values()] * 2)
    # The norm scale (ndim 1) is not decayed; with zero gradients only decay would move it.
    zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 2
    still = _run(optimizer, params, zeros, [3e-3, 3e-3])
    np.testing.assert_array_equal(still["scale"], params["scale"])
    np.testing.assert_allclose(still["w"], params["w"] * (1 - 0.1) ** 2, rtol=1e-6)


def test_adamw_matches_optax_adamw(rng):
    config = OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.01, eps=1e-6)
    params, grads = _problem(rng, steps=8)
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
    params, grads = _problem(rng, steps=1)
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
