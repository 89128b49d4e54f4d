"""The train step: a pure function (state, batch, learning rate) -> (state, metrics).

Losses are computed in fp32 whatever the compute dtype. The MLM loss runs the head on the masked
positions only, packed into a dense buffer (`SparseHead`); the CLM loss on every position with
a target. Gradient accumulation scans over microbatches and sums per-token loss sums, so the
update equals the full-batch one. A non-finite loss or gradient skips the update (counted).
Under FSDP the parameters are gathered whole for compute and their gradients scattered back to
the shards (see `ettin_jax.training.mesh`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from data_pipelines.microbatches import split_microbatches
from data_pipelines.objectives import IGNORE
from ettin_jax.models import EttinModel, ModelConfig
from ettin_jax.models.config import Objective
from ettin_jax.training.mesh import BATCH_AXES, batch_sharding, compute_sharding
from pallas_kernels import capacity_for, overflow, pack_masked_tokens
from ettin_jax.training.optimizer import set_learning_rate
from ettin_jax.training.state import Params, TrainState, model_graph

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def loss_sums(model: EttinModel, batch: Batch, *, deterministic: bool,
              dropout_rng: jax.Array | None, sparse_head: SparseHead | None = None) -> Metrics:
    """Summed cross-entropy (fp32), target count and correct predictions of one (micro)batch.

    The head runs on every position with a label, or with `sparse_head` (MLM) on the masked
    positions only, packed per device; then `mlm_overflow` counts masked tokens that did not
    fit the packing capacity (0 unless the data masks more than the ratio promises).
    """
    hidden = model(batch["input_ids"], batch["segment_ids"], batch["positions"],
                   deterministic=deterministic, dropout_rng=dropout_rng)
    labels = batch["labels"]
    if sparse_head is None:
        return _cross_entropy_sums(model.logits(hidden), labels, labels != IGNORE)
    graph, params = nnx.split(model)

    def packed_head(params, hidden, labels):
        rows, seq = labels.shape
        capacity = capacity_for(rows, seq, sparse_head.mask_ratio)
        packed = pack_masked_tokens(hidden, labels != IGNORE, capacity)
        sums = _cross_entropy_sums(nnx.merge(graph, params).logits(packed.values),
                                   labels.reshape(-1)[packed.indices], packed.valid)
        sums["mlm_overflow"] = overflow(packed, capacity).astype(jnp.float32)
        return sums if sparse_head.mesh is None else jax.lax.psum(sums, BATCH_AXES)

    if sparse_head.mesh is None:
        return packed_head(params, hidden, labels)
    rows = PartitionSpec(BATCH_AXES)
    return jax.shard_map(packed_head, mesh=sparse_head.mesh,
                         in_specs=(PartitionSpec(), rows, rows), out_specs=PartitionSpec(),
                         check_vma=False)(params, hidden, labels)


@dataclasses.dataclass(frozen=True)
class SparseHead:
    """The MLM head on masked tokens only: packed (`pallas_kernels.pack_masked_tokens`) with a
    static capacity from `mask_ratio` (plus slack, `capacity_for`), on each device's own rows
    when `mesh` is given (batch rows split over its data and fsdp axes)."""

    mask_ratio: float
    mesh: Mesh | None = None


def _cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metrics:
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    safe_labels = jnp.where(weights > 0, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "targets": jnp.sum(weights),
            "correct": jnp.sum(correct * weights)}


def make_train_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    seed: int, microbatch_size: int | None = None,
                    compute_shardings: Params | None = None,
                    sparse_head: SparseHead | None = None) -> Callable:
    """train_step(state, batch, learning_rate) -> (state, metrics), ready for jax.jit.

    A batch of R rows runs as R / microbatch_size microbatches (the layout of
    `data_pipelines.microbatches`; None: one), decided from its static shape, so batch-size
    warmup feeds growing batches of whole microbatches to the same function. Parameters are
    placed on `compute_shardings` (FSDP: gathered, `mesh.compute_sharding`) while the model
    runs; None leaves placement to XLA. `sparse_head`: the MLM head on packed masked tokens
    (`loss_sums`). Dropout keys come from (seed, step, microbatch). A step whose loss or
    gradient is not finite, or whose masked tokens overflowed the packing, is not applied.
    metrics: loss (mean over targets), accuracy, targets, grad_norm, learning_rate,
    real_tokens (non-padding tokens of the batch), finite (0/1), mlm_overflow (with a sparse
    head), skipped and nonfinite_streak (the state's counters after the step).
    """

    def microbatch_grads(params, batch, rng):
        def loss_fn(p):
            model = nnx.merge(graph, _place(p, compute_shardings))
            sums = loss_sums(model, batch, deterministic=False, dropout_rng=rng,
                             sparse_head=sparse_head)
            return sums["loss_sum"], sums

        return jax.grad(loss_fn, has_aux=True)(params)

    def train_step(state: TrainState, batch: Batch, learning_rate: jax.Array):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
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
        )
        metrics = {"loss": loss, "accuracy": sums["correct"] / targets,
                   "targets": sums["targets"], "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(learning_rate, jnp.float32),
                   "real_tokens": jnp.sum(batch["segment_ids"] != 0),
                   "finite": finite.astype(jnp.float32), "skipped": new_state.skipped,
                   "nonfinite_streak": new_state.nonfinite_streak}
        if "mlm_overflow" in sums:
            metrics["mlm_overflow"] = sums["mlm_overflow"]
        return new_state, metrics

    return train_step


def make_eval_step(graph: nnx.GraphDef, *, microbatch_size: int | None = None,
                   compute_shardings: Params | None = None,
                   sparse_head: SparseHead | None = None) -> Callable:
    """eval_step(params, batch) -> loss sums (no dropout), for held-out evaluation; microbatches,
    parameter placement and the sparse head as in `make_train_step`."""

    def eval_step(params, batch: Batch) -> Metrics:
        model = nnx.merge(graph, _place(params, compute_shardings))
        return _accumulate(
            lambda micro, index: loss_sums(model, micro, deterministic=True, dropout_rng=None,
                                           sparse_head=sparse_head),
            batch, microbatch_size)

    return eval_step


def sharded_train_step(config: ModelConfig, objective: Objective,
                       optimizer: optax.GradientTransformation, shardings: TrainState,
                       mesh: Mesh, *, seed: int, microbatch_size: int | None = None,
                       mlm_mask_ratio: float | None = None) -> Callable:
    """The train step of `objective`'s model under jax.jit with explicit shardings: the state
    stays on `shardings` and is donated, batch rows are split over every device, parameters
    are gathered from their FSDP shards for compute, attention kernels run per shard. An MLM
    head runs on each device's packed masked tokens at `mlm_mask_ratio` (None: on every
    position). One compile per distinct batch shape."""
    sparse_head = (SparseHead(mlm_mask_ratio, mesh)
                   if objective == "mlm" and mlm_mask_ratio is not None else None)
    step = make_train_step(model_graph(config, objective, mesh), optimizer, seed=seed,
                           microbatch_size=microbatch_size,
                           compute_shardings=jax.tree.map(compute_sharding, shardings.params),
                           sparse_head=sparse_head)
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), None),
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
