"""The train step: a pure function (state, batch) -> (state, metrics).

The losses (`ettin_jax.training.losses`) are fp32 sums: CLM on every position with a target,
MLM on the masked positions only. Gradient accumulation scans over microbatches and sums the
per-token loss sums, so the update equals the full-batch one. A non-finite loss or gradient
skips the update (counted). Dropout draws its masks per row of the step's batch (keys from
seed, step and the row's index), so they do not depend on the mesh or the microbatch size.

On a mesh (`sharded_train_step`) the gradients are computed per device inside `jax.shard_map`
over the batch axes (data, fsdp); the optimizer update stays a global-view jit. Per device:
each parameter's FSDP shard is cast to the dtype the model computes it in (bf16 under
`model.dtype: bfloat16`; the token embedding in the stream dtype, fp32 under autocast, where
its lookup is fp32) and all-gathered over `fsdp`; the gradient of that gather is a
reduce-scatter over `fsdp` in fp32 (a custom VJP), so every microbatch's weight gradients
arrive as shards and are accumulated sharded over the microbatch loop (a `lax.scan`, whose
carry passes an optimization barrier so that XLA does not move the reduce-scatters after the
loop onto a full-size accumulator); after the loop one psum over `data` (and over `fsdp` for
the replicated norm scales and bias) completes them, once per step. The kernels run unsharded
inside the body (`kernels_sharded_over(None)`): the body already holds one device's rows.

Why shard_map rather than sharding constraints on the global view: in the compiled v5p program
of the global-view step (ettin-68m on v5p:2x2x1, `benchmarks/step_collectives.py`,
docs/benchmarks.md) XLA's partitioner all-reduced every layer's weight gradients at full size
in bf16 inside the microbatch loop, under FSDP and data parallelism alike, and the tied
embedding's fp32 gradient (100 MB) too, once per microbatch; where the collectives go, and in
which dtype, was its heuristics' choice. shard_map states the communication outright, and the
compiled program shows it (tests/test_tpu_aot.py checks it). JAX's unreduced shardings could
express "reduce after the loop" in the global view but need explicit mesh axes throughout.
Reduction order changes with the mesh: fp32 losses and gradient norms agree with the
global-view step to ~1e-7 relative; under bf16 autocast to ~3e-4 (it reduced gradients in
bf16, this step in fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.microbatches import microbatch_rows, split_microbatches
from ettin_jax.models import ModelConfig
from ettin_jax.models.config import Objective
from ettin_jax.training.losses import Batch, Sums, loss_sums
from ettin_jax.training.mesh import BATCH_AXES, batch_sharding
from ettin_jax.training.optimizer import set_learning_rate
from ettin_jax.training.schedules import add_tokens, tokens_as_float32
from ettin_jax.training.state import Params, TrainState, model_graph
from pallas_kernels.partitioning import ShardedOver, kernels_sharded_over

LearningRate = Callable[[jax.Array], jax.Array] | float


def make_train_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    seed: int, learning_rate: LearningRate, microbatch_size: int | None = None,
                    max_microbatch_size: int | None = None,
                    mlm_mask_ratio: float | None = None,
                    param_shardings: Params | None = None,
                    gather_dtypes: Params | None = None) -> Callable:
    """train_step(state, batch) -> (state, metrics), ready for jax.jit.

    `learning_rate`: the schedule, lr(phase tokens as float32) -> float32
    (`schedules.learning_rate_schedule`), evaluated in the step on the state's count of the
    phase's real tokens before this batch; or a constant. The step adds the batch's real tokens
    to that count, so the host never has to send a learning rate or read a token count.

    A batch of R rows runs as whole microbatches (the layout of `data_pipelines.microbatches`;
    microbatch_size None: one piece): as few as fit, each a multiple of microbatch_size of at
    most max_microbatch_size rows (`microbatch_rows`; None: microbatch_size rows each), decided
    from its static shape, so batch-size warmup feeds growing batches of whole microbatches to
    the same function and the full batch runs in the largest pieces a chip holds. The update
    does not depend on the split (dropout is keyed by row, the loss normalised over the batch).
    `mlm_mask_ratio`: the MLM head on the packed masked tokens (`loss_sums`). With
    `param_shardings` (the parameters' storage NamedShardings on one mesh), the gradients are
    computed per device under shard_map (the module docstring); without, in one piece with
    placement left to XLA (one device, or tests); `gather_dtypes` (a
    tree like the parameters of dtypes or None) is the dtype each FSDP shard is gathered in
    (None: its own). Dropout keys come from (seed, step, row of the batch). A step whose loss or
    gradient is not finite, or whose masked tokens overflowed the packing, is not applied.
    metrics: loss (mean over targets), accuracy, targets, grad_norm, learning_rate,
    real_tokens (non-padding tokens of the batch), finite (0/1), mlm_overflow (with a sparse
    head), skipped and nonfinite_streak (the state's counters after the step).
    """

    def microbatch_loss(params, batch, rng):
        """(loss sum, sums) of one microbatch with whole parameters; dropout keyed by row."""
        batch = dict(batch)
        keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(batch.pop(_ROW))
        sums = loss_sums(nnx.merge(graph, params), batch, deterministic=False,
                         dropout_rng=keys, mlm_mask_ratio=mlm_mask_ratio)
        return sums["loss_sum"], sums

    def gradients(params, batch, rng):
        rows = batch["input_ids"].shape[0]
        size = microbatch_rows(rows, microbatch_size, max_microbatch_size)
        if param_shardings is not None:
            return _per_device_gradients(
                lambda whole, micro: microbatch_loss(whole, micro, rng), params, batch,
                param_shardings=param_shardings, gather_dtypes=gather_dtypes,
                microbatch_size=size)
        batch = dict(batch, **{_ROW: jnp.arange(rows)})
        grad = jax.grad(lambda p, micro: microbatch_loss(p, micro, rng), has_aux=True)
        return _accumulate(lambda micro, index: grad(params, micro), batch, size)

    schedule = learning_rate if callable(learning_rate) else (
        lambda tokens: jnp.full((), learning_rate, jnp.float32))

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        learning_rate = schedule(tokens_as_float32(state.phase_tokens))
        real_tokens = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.int32)
        grads, sums = gradients(state.params, batch, rng)
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
                   max_microbatch_size: int | None = None,
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
                batch, microbatch_rows(batch["input_ids"].shape[0], microbatch_size,
                                       max_microbatch_size))

    return eval_step


def sharded_train_step(config: ModelConfig, objective: Objective,
                       optimizer: optax.GradientTransformation, shardings: TrainState,
                       mesh: Mesh, *, seed: int, learning_rate: LearningRate,
                       microbatch_size: int | None = None,
                       max_microbatch_size: int | None = None,
                       mlm_mask_ratio: float | None = None) -> Callable:
    """The train step of `objective`'s model under jax.jit with explicit shardings: the state
    stays on `shardings` and is donated, batch rows are split over every device, gradients are
    computed per device (shard_map; FSDP shards gathered in the compute dtype, gradients
    reduce-scattered per microbatch and reduced over `data` once per step). An MLM
    head runs on each device's packed masked tokens at `mlm_mask_ratio` (None: on every
    position). `learning_rate` and microbatches: as in `make_train_step`. One compile per
    distinct batch shape."""
    step = make_train_step(model_graph(config, objective), optimizer, seed=seed,
                           learning_rate=learning_rate, microbatch_size=microbatch_size,
                           max_microbatch_size=max_microbatch_size,
                           mlm_mask_ratio=mlm_mask_ratio if objective == "mlm" else None,
                           param_shardings=shardings.params,
                           gather_dtypes=gather_dtypes(config, shardings.params))
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)


def gather_dtypes(config: ModelConfig, params: Params) -> Params:
    """The dtype each parameter of a tree like `params` is gathered in for compute: the token
    embedding in config.stream_dtype (its lookup runs in that dtype; the tied projection casts
    it itself), every other weight matrix in config.dtype, vectors (norm scales, bias; never
    sharded) None (as stored)."""
    def dtype(path, leaf):
        if "tok_embeddings" in _names(path):
            return jnp.dtype(config.stream_dtype)
        return jnp.dtype(config.dtype) if len(_shape(leaf)) >= 2 else None

    return jax.tree_util.tree_map_with_path(dtype, params)


def _names(path) -> list[str]:
    return [str(getattr(entry, "key", entry)) for entry in path]


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()) or ())


_ROW = "__row__"  # the batch-row index of every row, carried through the microbatch split


def _fsdp_axis(spec: PartitionSpec) -> int | None:
    for axis, entry in enumerate(spec):
        if entry == "fsdp" or (isinstance(entry, tuple) and "fsdp" in entry):
            return axis
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather(shard: jax.Array, axis: int, dtype, rows_first: bool) -> jax.Array:
    """The whole parameter from its `fsdp` shards (inside shard_map), gathered in `dtype`.
    Its gradient is reduce-scattered over `fsdp` in the shard's dtype (fp32): only the weights
    travel in the compute dtype. `rows_first`: the gradient is reduce-scattered along axis 0
    and then exchanged (all-to-all) into shards along `axis`."""
    return jax.lax.all_gather(shard.astype(dtype), "fsdp", axis=axis, tiled=True)


def _gather_fwd(shard, axis, dtype, rows_first):
    return _gather(shard, axis, dtype, rows_first), jnp.zeros((0,), shard.dtype)


def _gather_bwd(axis, dtype, rows_first, empty, g):
    g = g.astype(empty.dtype)
    if not rows_first or axis == 0:
        return (jax.lax.psum_scatter(g, "fsdp", scatter_dimension=axis, tiled=True),)
    # The token embedding's gradient (a scatter-add) scattered along its embed axis was
    # all-reduced at full size and sliced by XLA:TPU, inside the loop; along the vocabulary it
    # is a reduce-scatter, and the all-to-all moves a quarter shard's bytes.
    rows = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=0, tiled=True)
    return (jax.lax.all_to_all(rows, "fsdp", split_axis=axis, concat_axis=0, tiled=True),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def _per_device_gradients(loss: Callable, params: Params, batch: Batch, *,
                          param_shardings: Params, gather_dtypes: Params | None,
                          microbatch_size: int | None):
    """(gradient sums on the parameters' storage shardings, loss sums) of the whole batch:
    the gradient of loss(whole parameters, microbatch) -> (loss, sums) per device under
    shard_map, accumulated over the device's microbatches, then reduced over the devices."""
    leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    mesh = leaves[0].mesh
    specs = jax.tree.map(lambda s: s.spec, param_shardings,
                         is_leaf=lambda x: isinstance(x, NamedSharding))
    if gather_dtypes is None:
        gather_dtypes = jax.tree.map(lambda _: None, specs,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
    devices = mesh.size
    rows = batch["input_ids"].shape[0]
    if rows % devices or (microbatch_size and microbatch_size % devices):
        raise ValueError(f"batch rows {rows} and train.microbatch_size={microbatch_size} must "
                         f"split evenly over the {devices} devices of the mesh")
    local_microbatch = microbatch_size // devices if microbatch_size else None
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def place(shards):
        def whole(path, shard, spec, dtype):
            axis = _fsdp_axis(spec)
            rows_first = "tok_embeddings" in _names(path) and shard.shape[0] % mesh.shape[
                "fsdp"] == 0
            return shard if axis is None else _gather(shard, axis, dtype or shard.dtype,
                                                      rows_first)

        return jax.tree_util.tree_map_with_path(whole, shards, specs, gather_dtypes,
                                                is_leaf=is_spec)

    def reduce(grad, spec):
        axes = tuple(a for a in BATCH_AXES if a != "fsdp" or _fsdp_axis(spec) is None)
        return jax.lax.psum(grad, axes)

    def body(shards, local):
        local_rows = local["input_ids"].shape[0]
        first = jax.lax.axis_index(BATCH_AXES) * local_rows
        local = dict(local, **{_ROW: first + jnp.arange(local_rows)})

        def micro(batch, index):
            return jax.grad(lambda p: loss(place(p), batch), has_aux=True)(shards)

        with kernels_sharded_over(None):  # the body holds one device's rows already
            grads, sums = _accumulate(micro, local, local_microbatch, keep_in_loop=True)
        grads = jax.tree.map(lambda g, spec: reduce(g, spec), grads, specs,
                             is_leaf=lambda x: x is None or is_spec(x))
        return grads, jax.lax.psum(sums, BATCH_AXES)

    return jax.shard_map(body, mesh=mesh, in_specs=(specs, PartitionSpec(BATCH_AXES)),
                         out_specs=(specs, PartitionSpec()), check_vma=False)(params, batch)


def _place(params: Params, shardings: Params | None) -> Params:
    return params if shardings is None else jax.lax.with_sharding_constraint(params, shardings)


def _accumulate(run: Callable[[Batch, jax.Array], object], batch: Batch,
                microbatch_size: int | None, *, keep_in_loop: bool = False):
    """Sum of run(microbatch, index) over the batch's microbatches of `microbatch_size` rows
    (which divides the rows: `microbatch_rows`; a scan, one call when the batch is a single
    microbatch). `keep_in_loop`: the running sum passes an optimization
    barrier each step, so XLA cannot move reductions of run's results out of the loop (its
    while-loop code motion would otherwise accumulate full-size unreduced gradients and
    reduce-scatter them once, at the cost of a full-size fp32 buffer per chip)."""
    rows = batch["input_ids"].shape[0]
    count = rows // microbatch_size if microbatch_size else 1
    if count == 1:
        return run(batch, jnp.zeros((), jnp.int32))
    split = split_microbatches(batch, count)
    first = jax.tree.map(lambda x: x[0], split)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(run, first, jnp.zeros((), jnp.int32)))

    def add(carry, inputs):
        index, micro = inputs
        total = jax.tree.map(jnp.add, carry, run(micro, index))
        return (jax.lax.optimization_barrier(total) if keep_in_loop else total), None

    total, _ = jax.lax.scan(add, zeros, (jnp.arange(count), split))
    return total
