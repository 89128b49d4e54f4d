"""The fine-tuning loop every downstream task shares: one seed of a sweep from its first step
(or its last checkpoint) to its results.

A task kind (`classification`, `retrieval`) describes one run as a `SeedRun`: the module to
train (graph and initial parameters), how a step's batch is made, the loss and gradient of a
batch, how the dev data is scored and how the result is exported. `run_seed` does the rest on
the training machinery: the mesh and sharding rules, one jitted update step with explicit
shardings and a donated state (`make_update_step`: the task's gradient, the optimizer at the
scheduled learning rate, non-finite updates skipped and counted), orbax checkpoints
(`TrainCheckpointer`, the same layout as a training run), metrics.jsonl, TensorBoard and a
progress bar (`MetricsLog`). A step's batch is a function of (seed, step), so a run killed at
any moment resumes from its last checkpoint to the losses an uninterrupted run gives; a run
whose results.json exists is done and is not rerun (with other settings it is refused).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ettin_jax.config.schema import CheckpointConfig, OptimizerConfig
from ettin_jax.errors import CheckpointError
from ettin_jax.finetune.config import FinetuneConfig
from ettin_jax.finetune.results import RESULTS_FILE, write_json
from ettin_jax.training.checkpoint import TrainCheckpointer
from ettin_jax.training.mesh import batch_sharding
from ettin_jax.training.metrics import MetricsLog
from ettin_jax.training.optimizer import make_optimizer, set_learning_rate
from ettin_jax.training.schedules import token_count
from ettin_jax.training.state import TrainState, module_shardings, state_shardings

Batch = dict[str, np.ndarray]
# (params, batch, dropout key) -> (loss, gradients, {metric: value}): a task's gradient.
LossAndGrads = Callable[[Any, Mapping[str, jax.Array], jax.Array],
                        tuple[jax.Array, Any, Mapping[str, jax.Array]]]
# Settings that change how a run executes, not what it computes: a resumed run may change them.
RUNTIME_SETTINGS = ("eval_batch_size", "logging_every_steps", "checkpoint_every_steps", "mesh")


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One run of a sweep, as a task kind describes it to `run_seed`.

    task: the task's name. seed: of the head's init, the data order and dropout. settings: what
    the run computes with (recorded in checkpoints and results.json; a resume with other values,
    `RUNTIME_SETTINGS` aside, is refused). module: the network to train (its nnx.Param state is
    what is trained, checkpointed and exported). optimizer: its configuration; warmup_fraction,
    final_lr_fraction: the schedule (linear warmup, then linear decay to final_lr_fraction x
    peak at the last step). steps_per_epoch, epochs: the run's length. batch(step): the host
    batch of a step (every process holds the whole batch). loss_and_grads: the task's
    gradient (`LossAndGrads`, jit-able). evaluate(module): the dev metrics of the module with
    given parameters. export(module, out): writes the fine-tuned model into `out`. meta: the
    checkpoint's `meta` item (what the weights are).
    """

    task: str
    seed: int
    settings: Mapping[str, Any]
    module: nnx.Module
    optimizer: OptimizerConfig
    warmup_fraction: float
    final_lr_fraction: float
    steps_per_epoch: int
    epochs: int
    batch: Callable[[int], Batch]
    loss_and_grads: LossAndGrads
    evaluate: Callable[[nnx.Module], dict[str, float]]
    export: Callable[[nnx.Module, Path], None]
    meta: Mapping[str, Any]

    @property
    def total_steps(self) -> int:
        """Optimizer updates of the run."""
        return self.epochs * self.steps_per_epoch


def run_seed(run: SeedRun, config: FinetuneConfig, mesh, out: Path) -> dict[str, Any]:
    """Runs `run` into `out` (see the module docstring) and returns its results, what
    out/results.json holds: task, member (out's parent folder), seed, steps, epochs, settings
    and the final dev `metrics`. Raises CheckpointError when `out` holds a run (finished or
    checkpointed) with other settings."""
    results_path = out / RESULTS_FILE
    if results_path.is_file():
        done = json.loads(results_path.read_text())
        check_same_settings(out, done["settings"], run.settings)
        return done
    graph, params = _split(run.module)
    optimizer = make_optimizer(run.optimizer)
    shardings = state_shardings(optimizer, module_shardings(run.module, mesh), params, mesh)
    schedule = learning_rate_schedule(run.optimizer.learning_rate, run.warmup_fraction,
                                      run.final_lr_fraction, run.total_steps)
    # The seed's key is an argument, not a constant: every seed of a sweep runs one program.
    step_fn = jax.jit(make_update_step(run.loss_and_grads, optimizer, schedule),
                      in_shardings=(shardings, batch_sharding(mesh), None),
                      out_shardings=(shardings, None), donate_argnums=0)
    seed_key = jax.random.key(run.seed)
    every = config.checkpoint_every_steps or run.steps_per_epoch
    settings = dict(run.settings)
    out.mkdir(parents=True, exist_ok=True)
    with TrainCheckpointer(out, CheckpointConfig(every_steps=every, keep=2)) as checkpoints:
        state = _start(checkpoints, params, optimizer, shardings, settings)
        step = int(state.step)
        log = MetricsLog(out, resume_step=step, desc=f"{run.task} {out.parent.name} {out.name}",
                         progress=(run.total_steps, step))
        metrics = None
        try:
            while step < run.total_steps:
                state, step_metrics = step_fn(state, place(run.batch(step), mesh), seed_key)
                step += 1
                epoch = step / run.steps_per_epoch
                epoch_end = step % run.steps_per_epoch == 0
                if step % config.logging_every_steps == 0 or epoch_end:
                    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    log.log({"step": step, "epoch": epoch, **record})
                log.advance()
                if epoch_end:
                    metrics = run.evaluate(nnx.merge(graph, state.params))
                    log.log({"step": step, "epoch": epoch,
                             **{f"eval_{k}": v for k, v in metrics.items()}})
                if step % every == 0 or step == run.total_steps:
                    checkpoints.save(step, state, meta=dict(run.meta), recipe=settings,
                                     progress={"tokens": 0, "step": step})
        finally:
            log.close()
        if metrics is None:  # resumed after the last step: evaluate what was saved
            metrics = run.evaluate(nnx.merge(graph, state.params))
    run.export(nnx.merge(graph, jax.device_get(state.params)), out)
    result = {"task": run.task, "member": out.parent.name, "seed": run.seed,
              "steps": run.total_steps, "epochs": run.epochs, "settings": settings,
              "metrics": metrics}
    write_json(results_path, result)
    return result


def make_update_step(loss_and_grads: LossAndGrads, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule) -> Callable:
    """step(state, batch, seed_key) -> (state, metrics): the task's loss and gradient at the
    state's parameters (dropout key: seed_key, the run's `jax.random.key(seed)`, folded with the
    step), then one optimizer update at the scheduled learning rate; an update whose loss or
    gradient is not finite is not applied and is counted (`skipped`). metrics: loss,
    learning_rate, grad_norm, skipped and the task's own."""

    def step(state: TrainState, batch, seed_key: jax.Array):
        rng = jax.random.fold_in(seed_key, state.step)
        loss, grads, extra = loss_and_grads(state.params, batch, rng)
        learning_rate = schedule(state.step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        opt_state = set_learning_rate(state.opt_state, learning_rate)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o),  # noqa: E731
                                             new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        return new_state, {"loss": loss, "learning_rate": learning_rate,
                           "grad_norm": grad_norm, "skipped": new_state.skipped, **extra}

    return step


def learning_rate_schedule(peak: float, warmup_fraction: float, final_lr_fraction: float,
                           total_steps: int) -> optax.Schedule:
    """Linear warmup over warmup_fraction of the steps, then linear decay to
    final_lr_fraction x peak at the last step (Composer's LinearWithWarmupScheduler, and
    transformers' linear schedule with warmup, as Ettin's fine-tuning scripts use them)."""
    warmup = round(warmup_fraction * total_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak, max(warmup, 1)),
        optax.linear_schedule(peak, peak * final_lr_fraction, max(total_steps - warmup, 1)),
    ], [warmup])


def pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` padded to `rows` rows of zeros (attention masks 0), with "weights" (1 on the
    real rows, 0 on the padding)."""
    real = len(next(iter(batch.values())))
    padded = {k: np.concatenate([v, np.zeros((rows - real, *v.shape[1:]), v.dtype)])
              for k, v in batch.items()}
    padded["weights"] = (np.arange(rows) < real).astype(np.float32)
    return padded


def map_rows(function: Callable, params, inputs: Batch, rows: int, mesh) -> np.ndarray:
    """function(params, batch) (jitted, one output row per input row) over every row of
    `inputs`, `rows` per call (the last call padded with all-padding rows, whose outputs are
    dropped; `rows` a multiple of the device count), as one numpy array."""
    count = len(next(iter(inputs.values())))
    outputs = []
    for start in range(0, count, rows):
        chunk = {k: v[start:start + rows] for k, v in inputs.items()}
        padded = pad_rows(chunk, rows)
        padded.pop("weights")
        output = function(params, place(padded, mesh))
        outputs.append(np.asarray(jax.device_get(output))[:min(rows, count - start)])
    return np.concatenate(outputs)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def place(batch: Batch, mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch (every process holds the whole batch), as global
    arrays split over the mesh's rows."""
    sharding = batch_sharding(mesh)
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(
        sharding, np.array_split(v, count)[index], v.shape) for k, v in batch.items()}


def check_same_settings(where: Path, saved: Mapping[str, Any],
                        settings: Mapping[str, Any]) -> None:
    """Raises CheckpointError naming every setting (`RUNTIME_SETTINGS` aside) in which the run
    in `where` differs from `settings`."""
    differ = sorted(k for k in set(saved) | set(settings)
                    if k not in RUNTIME_SETTINGS and saved.get(k) != settings.get(k))
    if differ:
        raise CheckpointError(f"{where} was fine-tuned with other settings ("
                              + ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}"
                                          for k in differ)
                              + f"); delete {where} to start it again with these")


def _split(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    graph, state = nnx.split(module)
    return graph, nnx.to_pure_dict(state)


def _start(checkpoints: TrainCheckpointer, params, optimizer, shardings: TrainState,
           settings: Mapping[str, Any]) -> TrainState:
    """The state to go on from: the latest checkpoint (refused by `check_same_settings` when
    it was written with other settings), else step 0 with `params`."""
    def fresh(params):
        zero = jnp.zeros([], jnp.int32)
        return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                          skipped=zero, nonfinite_streak=zero,
                          phase_tokens=jnp.asarray(token_count(0)))

    latest = checkpoints.latest_step()
    if latest is None:
        return jax.jit(fresh, out_shardings=shardings)(jax.device_put(params, shardings.params))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(fresh, params), shardings)
    state, _, saved = checkpoints.restore(latest, abstract)
    check_same_settings(checkpoints.member_dir, saved, settings)
    return state
