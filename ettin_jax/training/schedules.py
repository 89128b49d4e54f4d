"""Learning-rate schedules as functions of real (non-padding) tokens seen, as Ettin times them.

warmup_stable_decay: linear warmup from 0 over `warmup_tokens`, then `start` x peak, then over the
last `decay_tokens` of the phase a decay to `floor` x peak:
    1-sqrt: f = floor + (start - floor) * (1 - sqrt(progress))
    linear: f = floor + (start - floor) * (1 - progress)
constant: `start` x peak throughout. `start` < 1 is Ettin's restart at a fraction of the peak for
a new phase (decay phase: 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from ettin_jax.config.schema import ScheduleConfig


def learning_rate_schedule(
    config: ScheduleConfig, *, peak: float, total_tokens: int, start: float = 1.0
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """lr(tokens) -> float32 for a phase of `total_tokens` real tokens (jit-able)."""
    if config.kind == "constant":
        return lambda tokens: jnp.full((), peak * start, jnp.float32)
    warmup = float(config.warmup_tokens)
    decay = float(min(config.decay_tokens, total_tokens))
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
