"""Train the members of an Ettin pair: recipe -> mesh -> data -> state -> steps -> checkpoints.

    train_pair(recipe, run_dir)          # RUN_DIR/encoder and RUN_DIR/decoder, same rows

Each member resumes from its latest complete checkpoint when there is one (same command after
a crash or kill), so the following losses are the ones an uninterrupted run would give.
SIGTERM (preemption) stops at the next step boundary after saving.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from data_pipelines.microbatches import MicrobatchQueue
from data_pipelines.pipeline import load_data_tokenizer, make_batch_iterator
from ettin_jax.config import Recipe, load_recipe, recipe_to_dict, recipe_to_yaml
from ettin_jax.errors import CheckpointError, ConfigError
from ettin_jax.models.config import Objective
from ettin_jax.models.describe import training_flops_per_token
from ettin_jax.training.checkpoint import (
    MEMBERS,
    TOKENIZER,
    TrainCheckpointer,
    checkpoint_meta,
    restore_weights,
)
from ettin_jax.training.distributed import merged_across_processes
from ettin_jax.training.mesh import batch_sharding, compute_sharding, make_mesh
from ettin_jax.training.metrics import MetricsLog, peak_flops
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.schedules import (
    batch_size_schedule,
    learning_rate_schedule,
    schedule_tokens,
)
from ettin_jax.training.state import (
    abstract_state,
    init_state,
    init_state_shardings,
    model_graph,
)
from ettin_jax.training.step import SparseHead, make_eval_step, sharded_train_step

RECIPE_FILE = "recipe.yaml"


@dataclasses.dataclass(frozen=True)
class MemberResult:
    """How a member's run ended: steps done, real tokens seen, last loss, and when it stopped
    early, why; `failed` when that was a training failure (non-finite updates, MLM packing
    overflow) rather than a preemption."""

    member: str
    step: int
    tokens: int
    loss: float | None
    stopped: str | None = None
    failed: bool = False


class _Preemption:
    """When to stop for a preemption notice (SIGTERM): at a step boundary, the same step on
    every process.

    One process: a SIGTERM handler sets a flag. Several (jax.distributed): JAX's preemption
    service takes the signal on whichever host gets it and agrees on a step that all hosts
    reach (`multihost_utils.reached_preemption_sync_point`); no Python handler is installed
    then, as it would take the signal away from that service.
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self._requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`. Call at every step, on every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_pair(recipe: Recipe, run_dir: str | Path, *,
               only: str | None = None) -> dict[str, MemberResult]:
    """Trains the recipe's members (train.objectives, or `only` "encoder"/"decoder") into
    RUN_DIR/<member>. Writes RUN_DIR/recipe.yaml; refuses a run dir holding another recipe."""
    run_dir = Path(run_dir)
    _claim_run_dir(run_dir, recipe)
    members = [m for m, objective in MEMBERS.items() if objective in recipe.train.objectives]
    if only is not None:
        if only not in MEMBERS:
            raise ConfigError(f"--only must be one of {', '.join(MEMBERS)}, got {only!r}")
        members = [only]
    tokenizer = load_data_tokenizer(recipe.data)
    results = {}
    with _Preemption() as preemption:
        for member in members:
            results[member] = train_member(recipe, MEMBERS[member], run_dir / member,
                                           tokenizer=tokenizer, preemption=preemption)
            if results[member].stopped:  # preempted or diverged: the next member waits
                break
    return results


def train_member(recipe: Recipe, objective: Objective, member_dir: Path, *, tokenizer,
                 preemption: _Preemption | None = None) -> MemberResult:
    """Trains one member until train.steps or train.tokens, resuming from member_dir's latest
    complete checkpoint."""
    train, data = recipe.train, recipe.data
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size "
                          f"is {recipe.model.vocab_size}")

    # Mesh and optimizer.
    mesh = make_mesh(recipe.mesh)
    rows = batch_sharding(mesh)
    _check_batch(recipe, mesh)
    optimizer = make_optimizer(recipe.optimizer)

    # State: resume, start from other weights, or initialise.
    checkpoints = TrainCheckpointer(member_dir, recipe.checkpoint)
    tokens, data_state = 0, None
    resume_step = checkpoints.latest_step()
    if resume_step is None:
        state, shardings = init_state(recipe.model, objective, optimizer, mesh, seed=train.seed,
                                      params=_initial_params(recipe, objective))
    else:  # restored straight into its shards: no initialisation to throw away
        checkpoints.check_compatible(resume_step, recipe.model, objective)
        shardings = init_state_shardings(recipe.model, objective, optimizer, mesh)
        target = abstract_state(shardings, recipe.model, objective, optimizer)
        state, progress, _ = checkpoints.restore(resume_step, target)
        tokens, data_state = progress["tokens"], progress["data"]
    step_fn = sharded_train_step(recipe.model, objective, optimizer, shardings, mesh,
                                 seed=train.seed, microbatch_size=train.microbatch_size,
                                 mlm_mask_ratio=data.mlm_mask_ratio)

    # Data: the same rows for both members; this process builds its own rows only. The queue
    # cuts full batches into the microbatches that batch-size warmup asks for.
    batches = make_batch_iterator(
        data, seq_len=train.seq_len, global_batch_size=train.global_batch_size, seed=train.seed,
        objective=objective, tokenizer=tokenizer, process_index=jax.process_index(),
        process_count=jax.process_count())
    microbatch = train.microbatch_size or train.global_batch_size
    queue = MicrobatchQueue(batches, train.global_batch_size // microbatch)
    if data_state is not None:
        queue.set_state(data_state)
    if jax.process_index() == 0 and not (member_dir / TOKENIZER).is_dir():
        tokenizer.save(member_dir / TOKENIZER)

    # Schedules, metrics, evaluation.
    learning_rate = learning_rate_schedule(recipe.schedule, peak=recipe.optimizer.learning_rate,
                                           total_tokens=schedule_tokens(train))
    batch_rows = batch_size_schedule(train)
    flops_per_token = training_flops_per_token(recipe.model, objective, seq_len=train.seq_len,
                                               mlm_mask_ratio=data.mlm_mask_ratio)["total"]
    meta = checkpoint_meta(recipe.model, objective, tokenizer.special_tokens)
    recipe_dict = recipe_to_dict(recipe)
    step = int(state.step)
    log = MetricsLog(member_dir, resume_step=step, desc=member_dir.name,
                     progress=(train.steps, step) if train.steps else (train.tokens, tokens),
                     enabled=jax.process_index() == 0, tensorboard=recipe.logging.tensorboard)
    peak = peak_flops(jax.devices()[0].device_kind)
    evaluate = _make_evaluator(recipe, objective, tokenizer, mesh, shardings.params)

    def finished() -> bool:
        return ((train.steps is not None and step >= train.steps)
                or (train.tokens is not None and tokens >= train.tokens))

    def load_batch(global_rows: int):
        """The next batch of `global_rows` rows, and the data state just after it (what a
        checkpoint of the step that consumes it must store)."""
        local = queue.take(global_rows // microbatch)
        return ({k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()},
                queue.get_state())

    stopped, failed, loss = None, False, None
    last_time = time.perf_counter()
    upcoming = None
    try:
        while not finished():
            size = batch_rows(tokens)
            batch, data_state = upcoming if upcoming is not None else load_batch(size)
            state, metrics = step_fn(state, batch, float(learning_rate(tokens)))
            step += 1
            # Build the next batch while the device computes this step, when its size is
            # already known: batches only grow, so a full batch is followed by full ones.
            prefetch = size == train.global_batch_size and step != train.steps
            upcoming = load_batch(size) if prefetch else None
            metrics = jax.device_get(metrics)
            real = int(metrics["real_tokens"])
            tokens += real
            loss = float(metrics["loss"])
            now = time.perf_counter()
            last = finished()
            every_eval = recipe.logging.eval_every_steps
            due_eval = bool(every_eval) and (step % every_eval == 0 or last)
            if step % recipe.logging.every_steps == 0 or last or due_eval:
                seconds = now - last_time
                record = {"step": step, "loss": loss, "accuracy": float(metrics["accuracy"]),
                          "learning_rate": float(metrics["learning_rate"]),
                          "grad_norm": float(metrics["grad_norm"]), "tokens": tokens,
                          "batch_rows": size, "tokens_per_s": real / seconds,
                          "step_time_s": seconds,
                          "flops_per_s": flops_per_token * real / seconds,
                          "skipped": int(metrics["skipped"])}
                if peak is not None:
                    record["mfu"] = record["flops_per_s"] / (peak * mesh.size)
                if due_eval:
                    record.update(evaluate(state.params))
                log.log(record)
            last_time = now
            log.advance(1 if train.steps else real)
            if metrics.get("mlm_overflow", 0) > 0:
                stopped, failed = (f"stopped at step {step}: {int(metrics['mlm_overflow'])} "
                                   f"masked tokens did not fit the MLM head's packing capacity "
                                   f"for data.mlm_mask_ratio={data.mlm_mask_ratio} (update "
                                   f"skipped); the data masks more tokens than its ratio"), True
            elif int(metrics["nonfinite_streak"]) >= train.max_nonfinite_steps:
                stopped, failed = (f"stopped at step {step}: {train.max_nonfinite_steps} "
                                   f"updates in a row had a non-finite loss or gradient "
                                   f"(skipped)"), True
            elif preemption is not None and preemption.reached(step):
                stopped = f"preempted (SIGTERM) at step {step}"
            if step % recipe.checkpoint.every_steps == 0 or last or stopped:
                progress = {"tokens": tokens, "data": merged_across_processes(data_state)}
                checkpoints.save(step, state, meta=meta, recipe=recipe_dict, progress=progress)
            if stopped:
                break
    finally:
        checkpoints.close()
        log.close()
    return MemberResult(member_dir.name, step, tokens, loss, stopped, failed)


def _make_evaluator(recipe: Recipe, objective: Objective, tokenizer, mesh, params_sharding):
    """evaluate(params) -> {eval_loss, eval_perplexity, eval_accuracy} on the same
    logging.eval_batches held-out batches every time (built once; fixed masks)."""
    if not recipe.logging.eval_every_steps:
        return lambda params: {}
    train = recipe.train
    heldout = dataclasses.replace(recipe.data, sources=recipe.data.heldout)
    batches = make_batch_iterator(
        heldout, seq_len=train.seq_len, global_batch_size=train.global_batch_size,
        seed=train.seed, objective=objective, tokenizer=tokenizer,
        process_index=jax.process_index(), process_count=jax.process_count())
    rows = batch_sharding(mesh)
    fixed = [{k: jax.make_array_from_process_local_data(rows, v) for k, v in next(batches).items()}
             for _ in range(recipe.logging.eval_batches)]
    sparse_head = SparseHead(recipe.data.mlm_mask_ratio, mesh) if objective == "mlm" else None
    step = jax.jit(make_eval_step(model_graph(recipe.model, objective, mesh),
                                  microbatch_size=train.microbatch_size,
                                  compute_shardings=jax.tree.map(compute_sharding,
                                                                 params_sharding),
                                  sparse_head=sparse_head),
                   in_shardings=(params_sharding, rows))

    def evaluate(params) -> dict[str, float]:
        sums = [jax.device_get(step(params, batch)) for batch in fixed]
        targets = max(sum(float(s["targets"]) for s in sums), 1.0)
        loss = sum(float(s["loss_sum"]) for s in sums) / targets
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
                "eval_accuracy": sum(float(s["correct"]) for s in sums) / targets}

    return evaluate


def _initial_params(recipe: Recipe, objective: Objective):
    """Weights of checkpoint.init_from (weights-only restore), or None for a fresh init."""
    if recipe.checkpoint.init_from is None:
        return None
    restored = restore_weights(recipe.checkpoint.init_from)
    source = restored.model.config
    if dataclasses.replace(source, preset=None) != dataclasses.replace(recipe.model, preset=None):
        raise CheckpointError(f"checkpoint.init_from {recipe.checkpoint.init_from} holds another "
                              f"architecture than model.* of the recipe")
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(restored.model))


def _check_batch(recipe: Recipe, mesh) -> None:
    train = recipe.train
    shards = mesh.size
    micro = train.microbatch_size or train.global_batch_size
    if micro % shards:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} with "
                          f"train.microbatch_size={train.microbatch_size}: each microbatch of "
                          f"{micro} rows must split over the {shards} devices of the mesh "
                          f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if train.global_batch_size % jax.process_count():
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible "
                          f"by the {jax.process_count()} processes")


def _claim_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Writes RUN_DIR/recipe.yaml, or checks that the one there is this recipe."""
    path = run_dir / RECIPE_FILE
    if path.is_file():
        existing = load_recipe(path)
        if existing != recipe:
            raise ConfigError(f"{run_dir} holds a run of another recipe ({path}); use another "
                              f"--run-dir or the same recipe to resume")
        return
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe_to_yaml(recipe))


