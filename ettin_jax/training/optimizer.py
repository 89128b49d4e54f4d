"""Ettin's optimizer as optax transforms: StableAdamW (and AdamW).

StableAdamW (Wortsman et al. 2023), exactly as Ettin ran it: optimi's StableAdamW with
`decouple_lr=True`, and no weight decay on parameters with ndim <= 1 (norm scales, biases), as
bert24's optimizer filter did. Per tensor, at step t with gradient g:

    m, v   <- b1 * m + (1 - b1) * g,  b2 * v + (1 - b2) * g^2
    m_hat  =  m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    RMS    =  sqrt(mean(g^2 / max(v_hat, eps^2)))
    lr_eff =  lr_t / max(1, RMS)                              (update clipping)
    p      <- p * (1 - (lr_eff / max_lr) * wd)                (fully decoupled decay, ndim > 1)
    p      <- p - lr_eff * m_hat / (sqrt(v_hat) + eps)

max_lr is the configured peak learning rate (`OptimizerConfig.learning_rate`), fixed for the
optimizer's life (optimi takes it from the constructor's lr). The decay sees the same clip factor
as the Adam step: a tensor whose update is clipped is also decayed less. Update clipping replaces
gradient-norm clipping. optax has no update clipping, so `scale_by_stable_adamw` is written here;
its state keeps optax-style raw moments m, v (optimi keeps debiased ones: the same numbers up to
fp32 rounding). tests/test_optimizer.py compares it with optimi step by step.

AdamW (`name: adamw`) is optax's: p <- p * (1 - lr_t * wd) - lr_t * m_hat / (sqrt(v_hat) + eps).

The learning rate is injected per step (`optax.inject_hyperparams`): the schedule is a function of
real tokens seen, which the train step knows and optax's step counter does not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ettin_jax.config.schema import OptimizerConfig


class StableAdamState(NamedTuple):
    """Step count and first/second moments (fp32, shaped like the parameters)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _bias_correction(beta: float, count: jax.Array) -> jax.Array:
    """1 - beta^t in fp32 to the last digit, as -expm1(t log beta) with log beta taken in double
    (fp32 `beta ** t` loses the low digits of 1 - beta^t: 1e-6 relative for 0.98 at t = 1)."""
    if beta == 0.0:
        return jnp.ones([], jnp.float32)
    return -jnp.expm1(count.astype(jnp.float32) * math.log(beta))


def scale_by_stable_adamw(b1: float, b2: float, eps: float,
                          decay_per_lr: float = 0.0) -> optax.GradientTransformation:
    """StableAdamW's step before the learning rate: per tensor
    (m_hat / (sqrt(v_hat) + eps) + decay_per_lr * p) / max(1, RMS), with the decay term only
    for parameters with ndim > 1. Scaled by -lr_t (`optax.scale_by_learning_rate`) this is
    p <- p * (1 - (lr_eff / max_lr) * wd) - lr_eff * m_hat / (sqrt(v_hat) + eps) for
    decay_per_lr = wd / max_lr: decay and step share the tensor's clip factor."""

    def init(params):
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
        return StableAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                               jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        if decay_per_lr and params is None:
            raise ValueError("StableAdamW with weight decay needs the parameters in update()")
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          state.nu, grads)
        mu_correction = _bias_correction(b1, count)
        nu_correction = _bias_correction(b2, count)

        def step(m, v, g, p):
            g32 = g.astype(jnp.float32)
            v_hat = v / nu_correction
            rms = jnp.sqrt(jnp.mean(jnp.square(g32) / jnp.maximum(v_hat, eps * eps)))
            direction = (m / mu_correction) / (jnp.sqrt(v_hat) + eps)
            if decay_per_lr and p.ndim > 1:
                direction = direction + decay_per_lr * p.astype(jnp.float32)
            return (direction / jnp.maximum(1.0, rms)).astype(g.dtype)

        if params is None:
            params = grads  # only shapes are read: no decay without params (checked above)
        return jax.tree.map(step, mu, nu, grads, params), StableAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def decays(params) -> object:
    """Weight-decay mask: True for matrices (ndim > 1), False for norm scales and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer of `config`; its learning rate is a hyperparameter set every step
    (`set_learning_rate`). With clip_grad_norm, gradients are clipped by global norm first."""

    def build(learning_rate):
        clip = (optax.clip_by_global_norm(config.clip_grad_norm) if config.clip_grad_norm
                else optax.identity())
        if config.name == "stable_adamw":
            # Fully decoupled decay relative to the peak (max_lr), inside the clipped step.
            return optax.chain(
                clip,
                scale_by_stable_adamw(config.b1, config.b2, config.eps,
                                      config.weight_decay / config.learning_rate),
                optax.scale_by_learning_rate(learning_rate),
            )
        return optax.chain(  # AdamW: p <- p * (1 - lr_t * wd) - lr_t * adam
            clip,
            optax.scale_by_adam(config.b1, config.b2, config.eps),
            optax.add_decayed_weights(config.weight_decay, mask=decays),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)


def set_learning_rate(opt_state, learning_rate: jax.Array):
    """`opt_state` of `make_optimizer` with the learning rate of the coming update."""
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return opt_state
