"""The train step: a pure function (state, batch, learning rate) -> (state, metrics).

Losses are computed in fp32 whatever the compute dtype. The MLM loss runs the head on the masked
positions only (the batch's static `masked_positions` list); the CLM loss on every position with
a target. Gradient accumulation scans over microbatches and sums per-token loss sums, so the
update equals the full-batch one. A non-finite loss or gradient skips the update (counted).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data_pipelines.objectives import IGNORE
from ettin_jax.models import EttinModel, gather_positions
from ettin_jax.training.optimizer import set_learning_rate
from ettin_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def loss_sums(model: EttinModel, batch: Batch, *, deterministic: bool,
              dropout_rng: jax.Array | None) -> Metrics:
    """Summed cross-entropy, target count and correct predictions of one (micro)batch."""
    hidden = model(batch["input_ids"], batch["segment_ids"], batch["positions"],
                   deterministic=deterministic, dropout_rng=dropout_rng)
    if "masked_positions" in batch:  # MLM: the head sees the masked positions only
        hidden = gather_positions(hidden, batch["masked_positions"])
        labels = jnp.take_along_axis(batch["labels"], batch["masked_positions"], axis=1)
        weights = batch["masked_valid"].astype(jnp.float32)
    else:
        labels = batch["labels"]
        weights = (labels != IGNORE).astype(jnp.float32)
    logits = model.logits(hidden).astype(jnp.float32)
    safe_labels = jnp.where(weights > 0, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "targets": jnp.sum(weights),
            "correct": jnp.sum(correct * weights)}


def make_train_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    seed: int, microbatches: int = 1) -> Callable:
    """train_step(state, batch, learning_rate) -> (state, metrics), ready for jax.jit.

    Dropout keys come from (seed, step). metrics: loss (mean over targets), accuracy, targets,
    grad_norm, learning_rate, real_tokens (non-padding tokens of the batch), finite (0/1),
    skipped and nonfinite_streak (the state's counters after the step).
    """

    def microbatch_grads(params, batch, rng):
        def loss_fn(p):
            sums = loss_sums(nnx.merge(graph, p), batch, deterministic=False, dropout_rng=rng)
            return sums["loss_sum"], sums

        return jax.grad(loss_fn, has_aux=True)(params)

    def train_step(state: TrainState, batch: Batch, learning_rate: jax.Array):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        if microbatches == 1:
            grads, sums = microbatch_grads(state.params, batch, rng)
        else:
            # Microbatch m takes rows m, m + n, m + 2n, ...: with rows sharded in contiguous
            # blocks, every microbatch stays spread over every device.
            split = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                    *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, inputs):
                index, micro = inputs
                g, s = microbatch_grads(state.params, micro, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                microbatch_grads, state.params, jax.tree.map(lambda x: x[0], split), rng))
            (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                            (jnp.arange(microbatches), split))
        targets = jnp.maximum(sums["targets"], 1.0)
        grads = jax.tree.map(lambda g: g / targets, grads)
        grad_norm = optax.tree.norm(grads)
        loss = sums["loss_sum"] / targets
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        opt_state = set_learning_rate(state.opt_state, learning_rate)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        metrics = {"loss": loss, "accuracy": sums["correct"] / targets,
                   "targets": sums["targets"], "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(learning_rate, jnp.float32),
                   "real_tokens": jnp.sum(batch["segment_ids"] != 0),
                   "finite": finite.astype(jnp.float32), "skipped": new_state.skipped,
                   "nonfinite_streak": new_state.nonfinite_streak}
        return new_state, metrics

    return train_step


def make_eval_step(graph: nnx.GraphDef) -> Callable:
    """eval_step(params, batch) -> loss sums (no dropout), for held-out evaluation."""

    def eval_step(params, batch: Batch) -> Metrics:
        return loss_sums(nnx.merge(graph, params), batch, deterministic=True, dropout_rng=None)

    return eval_step
