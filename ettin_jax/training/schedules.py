"""Schedules as functions of real (non-padding) tokens seen, as Ettin times them: the learning
rate, and the batch size during batch-size warmup.

Learning rate, warmup_stable_decay: linear warmup from 0 over `warmup_tokens` to `start` x peak,
then constant, then over the last `decay_tokens` of the phase (null: all of it) a decay to
`floor` x peak:
    1-sqrt: f = floor + (start - floor) * (1 - sqrt(progress))
    linear: f = floor + (start - floor) * (1 - progress)
constant: `start` x peak throughout. `start` < 1 is Ettin's restart at a fraction of the peak for
a new phase (decay phase: 0.5).

Batch size: from one microbatch, growing linearly in tokens to the global batch at
`batch_warmup_tokens`, in whole microbatches (each distinct size compiles the step once).

Token count on the device: the train step evaluates the learning rate itself, from a count of
the phase's real tokens that it carries in the train state (no host round trip per step).
Phases reach 1.7T tokens, beyond int32, and JAX runs without 64-bit types, so the count is two
int32 digits in base 2**24 (`token_count`): both convert to float32 exactly, so the float32 the
schedule sees is the correctly rounded count, the same number the host computes from a Python
int.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.config.schema import ScheduleConfig, TrainConfig


def learning_rate_schedule(
    config: ScheduleConfig, *, peak: float, total_tokens: int
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """lr(tokens) -> float32 for a phase of `total_tokens` real tokens (jit-able)."""
    start = config.start
    if config.kind == "constant":
        return lambda tokens: jnp.full((), peak * start, jnp.float32)
    warmup = float(config.warmup_tokens)
    decay = float(total_tokens if config.decay_tokens is None
                  else min(config.decay_tokens, total_tokens))
    decay_start = float(total_tokens) - decay

    def schedule(tokens):
        t = jnp.asarray(tokens, jnp.float32)
        warm = jnp.minimum(1.0, (t + 1.0) / warmup) if warmup > 0 else 1.0
        progress = jnp.clip((t - decay_start) / max(decay, 1.0), 0.0, 1.0)
        shape = jnp.sqrt(progress) if config.decay == "1-sqrt" else progress
        factor = jnp.where(t < decay_start, start,
                           config.floor + (start - config.floor) * (1.0 - shape))
        return (peak * warm * factor).astype(jnp.float32)

    return schedule


def schedule_tokens(train: TrainConfig) -> int:
    """The token length the learning-rate schedule spans: train.tokens, else the token slots of
    train.steps full batches."""
    if train.tokens is not None:
        return train.tokens
    return train.steps * train.global_batch_size * train.seq_len


def batch_size_schedule(train: TrainConfig) -> Callable[[int], int]:
    """rows(tokens) -> the global batch rows of the next step after `tokens` real tokens.

    Without warmup (train.batch_warmup_tokens = 0): global_batch_size throughout. With it:
    k microbatches of train.microbatch_size rows, k = 1 + floor((M - 1) * tokens / warmup)
    capped at M = global_batch_size / microbatch_size, so k = M from `warmup` tokens on.
    Non-decreasing in tokens.
    """
    full = train.global_batch_size
    if not train.batch_warmup_tokens:
        return lambda tokens: full
    micro, warmup = train.microbatch_size, train.batch_warmup_tokens
    count = full // micro

    def rows(tokens: int) -> int:
        return micro * min(count, 1 + (count - 1) * int(tokens) // warmup)

    return rows


_DIGIT_BITS = 24
_DIGIT = 1 << _DIGIT_BITS


def token_count(tokens: int) -> np.ndarray:
    """The device representation of a token count: int32 [high, low] digits in base 2**24
    (exact up to 2**55 tokens)."""
    if tokens < 0:
        raise ValueError(f"a token count cannot be negative, got {tokens}")
    return np.array([tokens >> _DIGIT_BITS, tokens & (_DIGIT - 1)], np.int32)


def add_tokens(count: jax.Array, tokens: jax.Array) -> jax.Array:
    """`count` (see `token_count`) plus `tokens` (an int32 scalar below 2**31 - 2**24), with
    the carry (jit-able)."""
    low = count[1] + tokens.astype(jnp.int32)
    return jnp.stack([count[0] + (low >> _DIGIT_BITS), low & (_DIGIT - 1)])


def tokens_as_float32(count: jax.Array) -> jax.Array:
    """The count as float32, correctly rounded: equal to float32(int(count)) (jit-able)."""
    return (count[0].astype(jnp.float32) * jnp.float32(_DIGIT)
            + count[1].astype(jnp.float32))


def count_value(count) -> int:
    """The count as a Python int (on the host)."""
    high, low = (int(v) for v in np.asarray(count))
    return (high << _DIGIT_BITS) + low
