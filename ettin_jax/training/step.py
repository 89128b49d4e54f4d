"""The train step: a pure function (state, batch) -> (state, metrics).

The losses (`ettin_jax.training.losses`) are fp32 sums: CLM on every position with a target,
MLM on the masked positions only. Gradient accumulation scans over microbatches and sums the
per-token loss sums, so the update equals the full-batch one. A non-finite loss or gradient
skips the update (counted). Under FSDP the parameters are gathered whole for compute and their
gradients scattered back to the shards (see `ettin_jax.training.mesh`); the attention and
packing kernels run per device shard of the batch (`kernels_sharded_over`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from data_pipelines.microbatches import split_microbatches
from ettin_jax.models import ModelConfig
from ettin_jax.models.config import Objective
from ettin_jax.training.losses import Batch, Sums, loss_sums
from ettin_jax.training.mesh import batch_sharding, compute_sharding, kernel_sharding
from ettin_jax.training.optimizer import set_learning_rate
from ettin_jax.training.schedules import add_tokens, tokens_as_float32
from ettin_jax.training.state import Params, TrainState, model_graph
from pallas_kernels.partitioning import ShardedOver, kernels_sharded_over

LearningRate = Callable[[jax.Array], jax.Array] | float


def make_train_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    seed: int, learning_rate: LearningRate, microbatch_size: int | None = None,
                    compute_shardings: Params | None = None,
                    mlm_mask_ratio: float | None = None,
                    sharded_over: ShardedOver | None = None) -> Callable:
    """train_step(state, batch) -> (state, metrics), ready for jax.jit.

    `learning_rate`: the schedule, lr(phase tokens as float32) -> float32
    (`schedules.learning_rate_schedule`), evaluated in the step on the state's count of the
    phase's real tokens before this batch; or a constant. The step adds the batch's real tokens
    to that count, so the host never has to send a learning rate or read a token count.

    A batch of R rows runs as R / microbatch_size microbatches (the layout of
    `data_pipelines.microbatches`; None: one), decided from its static shape, so batch-size
    warmup feeds growing batches of whole microbatches to the same function. Parameters are
    placed on `compute_shardings` (FSDP: gathered, `mesh.compute_sharding`) while the model
    runs; None leaves placement to XLA. `mlm_mask_ratio`: the MLM head on the packed masked
    tokens (`loss_sums`). `sharded_over`: where the batch lives on the mesh, so that the
    kernels run per shard. Dropout keys come from (seed, step, microbatch). A step whose loss or
    gradient is not finite, or whose masked tokens overflowed the packing, is not applied.
    metrics: loss (mean over targets), accuracy, targets, grad_norm, learning_rate,
    real_tokens (non-padding tokens of the batch), finite (0/1), mlm_overflow (with a sparse
    head), skipped and nonfinite_streak (the state's counters after the step).
    """

    def microbatch_grads(params, batch, rng):
        def loss_fn(p):
            model = nnx.merge(graph, _place(p, compute_shardings))
            sums = loss_sums(model, batch, deterministic=False, dropout_rng=rng,
                             mlm_mask_ratio=mlm_mask_ratio)
            return sums["loss_sum"], sums

        return jax.grad(loss_fn, has_aux=True)(params)

    schedule = learning_rate if callable(learning_rate) else (
        lambda tokens: jnp.full((), learning_rate, jnp.float32))

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        learning_rate = schedule(tokens_as_float32(state.phase_tokens))
        real_tokens = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.int32)
        with kernels_sharded_over(sharded_over):
            grads, sums = _accumulate(
                lambda micro, index: microbatch_grads(state.params, micro,
                                                      jax.random.fold_in(rng, index)),
                batch, microbatch_size)
        targets = jnp.maximum(sums["targets"], 1.0)
        grads = jax.tree.map(lambda g: g / targets, grads)
        grad_norm = optax.tree.norm(grads)
        loss = sums["loss_sum"] / targets
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (sums.get("mlm_overflow", 0.0) == 0)

        opt_state = set_learning_rate(state.opt_state, learning_rate)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(apply, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            skipped=state.skipped + (~apply).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            phase_tokens=add_tokens(state.phase_tokens, real_tokens),
        )
        metrics = {"loss": loss, "accuracy": sums["correct"] / targets,
                   "targets": sums["targets"], "grad_norm": grad_norm,
                   "learning_rate": learning_rate, "real_tokens": real_tokens,
                   "finite": finite.astype(jnp.float32), "skipped": new_state.skipped,
                   "nonfinite_streak": new_state.nonfinite_streak}
        if "mlm_overflow" in sums:
            metrics["mlm_overflow"] = sums["mlm_overflow"]
        return new_state, metrics

    return train_step


def make_eval_step(graph: nnx.GraphDef, *, microbatch_size: int | None = None,
                   compute_shardings: Params | None = None, mlm_mask_ratio: float | None = None,
                   sharded_over: ShardedOver | None = None) -> Callable:
    """eval_step(params, batch) -> loss sums (no dropout), for held-out evaluation; microbatches,
    parameter placement, the MLM head and kernel sharding as in `make_train_step`."""

    def eval_step(params, batch: Batch) -> Sums:
        model = nnx.merge(graph, _place(params, compute_shardings))
        with kernels_sharded_over(sharded_over):
            return _accumulate(
                lambda micro, index: loss_sums(model, micro, deterministic=True,
                                               dropout_rng=None, mlm_mask_ratio=mlm_mask_ratio),
                batch, microbatch_size)

    return eval_step


def sharded_train_step(config: ModelConfig, objective: Objective,
                       optimizer: optax.GradientTransformation, shardings: TrainState,
                       mesh: Mesh, *, seed: int, learning_rate: LearningRate,
                       microbatch_size: int | None = None,
                       mlm_mask_ratio: float | None = None) -> Callable:
    """The train step of `objective`'s model under jax.jit with explicit shardings: the state
    stays on `shardings` and is donated, batch rows are split over every device, parameters
    are gathered from their FSDP shards for compute, attention kernels run per shard. An MLM
    head runs on each device's packed masked tokens at `mlm_mask_ratio` (None: on every
    position). `learning_rate`: as in `make_train_step`. One compile per distinct batch
    shape."""
    step = make_train_step(model_graph(config, objective), optimizer, seed=seed,
                           learning_rate=learning_rate, microbatch_size=microbatch_size,
                           compute_shardings=jax.tree.map(compute_sharding, shardings.params),
                           mlm_mask_ratio=mlm_mask_ratio if objective == "mlm" else None,
                           sharded_over=kernel_sharding(mesh))
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)


def _place(params: Params, shardings: Params | None) -> Params:
    return params if shardings is None else jax.lax.with_sharding_constraint(params, shardings)


def _accumulate(run: Callable[[Batch, jax.Array], object], batch: Batch,
                microbatch_size: int | None):
    """Sum of run(microbatch, index) over the batch's microbatches (a scan; one call when
    the batch is a single microbatch)."""
    rows = batch["input_ids"].shape[0]
    count = rows // microbatch_size if microbatch_size else 1
    if microbatch_size and rows % microbatch_size:
        raise ValueError(f"a batch of {rows} rows is not whole microbatches of "
                         f"{microbatch_size} rows")
    if count == 1:
        return run(batch, jnp.zeros((), jnp.int32))
    split = split_microbatches(batch, count)
    first = jax.tree.map(lambda x: x[0], split)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(run, first, jnp.zeros((), jnp.int32)))

    def add(carry, inputs):
        index, micro = inputs
        return jax.tree.map(jnp.add, carry, run(micro, index)), None

    total, _ = jax.lax.scan(add, zeros, (jnp.arange(count), split))
    return total
