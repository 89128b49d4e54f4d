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
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

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
