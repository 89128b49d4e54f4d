"""Ettin's optimizer as optax transforms: StableAdamW (and AdamW), decoupled weight decay.

StableAdamW (Wortsman et al. 2023, as Ettin used it through `optimi`): Adam moments with bias
correction, and per-tensor update clipping instead of gradient clipping: a tensor's step is
divided by max(1, RMS) with RMS = sqrt(mean(g^2 / max(v_hat, eps^2))). Weight decay is fully
decoupled, p <- p * (1 - (lr_t / peak_lr) * wd), and skips parameters with ndim <= 1 (norm scales,
biases). optax has AdamW but no update clipping, so `scale_by_stable_adam` is written here.

The learning rate is injected per step (`optax.inject_hyperparams`): the schedule is a function of
real tokens seen, which the train step knows and optax's step counter does not.
"""

from __future__ import annotations

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


def scale_by_stable_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam direction m_hat / (sqrt(v_hat) + eps), divided per tensor by max(1, RMS)."""

    def init(params):
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
        return StableAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                               jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          state.nu, grads)
        mu_correction = 1 - b1 ** count.astype(jnp.float32)
        nu_correction = 1 - b2 ** count.astype(jnp.float32)

        def direction(m, v, g):
            v_hat = v / nu_correction
            rms = jnp.sqrt(jnp.mean(jnp.square(g.astype(jnp.float32))
                                    / jnp.maximum(v_hat, eps * eps)))
            step = (m / mu_correction) / (jnp.sqrt(v_hat) + eps)
            return (step / jnp.maximum(1.0, rms)).astype(g.dtype)

        return jax.tree.map(direction, mu, nu, grads), StableAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def decays(params) -> object:
    """Weight-decay mask: True for matrices (ndim > 1), False for norm scales and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer of `config`; its learning rate is a hyperparameter set every step
    (`set_learning_rate`). With clip_grad_norm, gradients are clipped by global norm first."""

    def build(learning_rate):
        if config.name == "stable_adamw":
            direction = scale_by_stable_adam(config.b1, config.b2, config.eps)
            # Fully decoupled: the decay follows the schedule relative to the peak.
            weight_decay = config.weight_decay / config.learning_rate
        else:
            direction = optax.scale_by_adam(config.b1, config.b2, config.eps)
            weight_decay = config.weight_decay  # AdamW: p <- p * (1 - lr_t * wd)
        return optax.chain(
            optax.clip_by_global_norm(config.clip_grad_norm) if config.clip_grad_norm
            else optax.identity(),
            direction,
            optax.add_decayed_weights(weight_decay, mask=decays),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)


def set_learning_rate(opt_state, learning_rate: jax.Array):
    """`opt_state` of `make_optimizer` with the learning rate of the coming update."""
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return opt_state
