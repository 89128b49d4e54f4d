"""Train the members of an Ettin pair: recipe -> mesh -> data -> state -> steps -> checkpoints.

    train_pair(recipe, run_dir)          # RUN_DIR/encoder and RUN_DIR/decoder, same rows

Each member resumes from its latest complete checkpoint when there is one (same command after
a crash or kill), so the following losses are the ones an uninterrupted run would give.
SIGTERM (preemption) stops at the next step boundary after saving.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from data_pipelines.microbatches import MicrobatchQueue
from data_pipelines.pipeline import load_data_tokenizer, make_batch_iterator
from data_pipelines.sources import SourceError, source_files, source_kind
from ettin_jax.config import Recipe, recipe_to_dict
from ettin_jax.errors import ConfigError
from ettin_jax.models.config import Objective
from ettin_jax.models.describe import training_flops_per_token
from ettin_jax.training.checkpoint import MEMBERS, TOKENIZER, TrainCheckpointer, checkpoint_meta
from ettin_jax.training.distributed import merged_across_processes
from ettin_jax.training.evaluation import make_evaluator
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.metrics import MetricsLog, peak_flops, read_metrics
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.phases import (
    Position,
    next_phase,
    phase_done,
    recipe_members,
    starting_position,
)
from ettin_jax.training.run_dir import claim_run_dir
from ettin_jax.training.schedules import (
    batch_size_schedule,
    learning_rate_schedule,
    schedule_tokens,
)
from ettin_jax.training.state import init_state_shardings
from ettin_jax.training.step import sharded_train_step

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


def train_pair(recipe: Recipe, run_dir: str | Path, *, only: str | None = None,
               force: bool = False) -> dict[str, MemberResult]:
    """Trains the recipe's members (train.objectives, or `only` "encoder"/"decoder") into
    RUN_DIR/<member>, each through every phase. Writes RUN_DIR/recipe.yaml; refuses a run dir
    holding another recipe unless the change is resume-compatible or `force`
    (`ettin_jax.training.run_dir`)."""
    run_dir = Path(run_dir)
    members = recipe_members(recipe, only)
    changes = claim_run_dir(run_dir, recipe, force=force)
    if changes and jax.process_index() == 0:
        print(f"{run_dir}: continuing with changed "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
              file=sys.stderr)
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
    """Trains one member through the recipe's phases (one phase when it lists none), each
    until its train.steps or train.tokens, resuming from member_dir's latest complete
    checkpoint in the phase and step it was written at."""
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size "
                          f"is {recipe.model.vocab_size}")
    phases = recipe.run_phases()
    mesh = make_mesh(recipe.mesh)
    _check_phases(recipe, mesh)
    checkpoints = TrainCheckpointer(member_dir, recipe.checkpoint)
    try:
        position = starting_position(recipe, objective, mesh, checkpoints)
        logged = read_metrics(member_dir)  # a finished run reports its last logged loss
        result = MemberResult(member_dir.name, int(position.state.step), position.tokens,
                              logged[-1]["loss"] if logged else None)
        while position.phase < len(phases):
            position, result = _train_phase(recipe, position, objective, member_dir, mesh,
                                            checkpoints, tokenizer=tokenizer,
                                            preemption=preemption)
            if result.stopped:
                break
    finally:
        checkpoints.close()
    return result


def _train_phase(recipe: Recipe, position: Position, objective: Objective, member_dir: Path,
                 mesh, checkpoints: TrainCheckpointer, *, tokenizer,
                 preemption: _Preemption | None) -> tuple[Position, MemberResult]:
    """Runs phase `position.phase` from `position` to its end (-> the next phase's start) or
    until it stops early (preemption, divergence)."""
    index = position.phase
    phase = recipe.run_phases()[index]
    phase_recipe = recipe.phase_recipe(phase)
    train, data = phase.train, phase.data
    rows = batch_sharding(mesh)
    optimizer = make_optimizer(phase.optimizer)
    shardings = init_state_shardings(phase.model, objective, optimizer, mesh)
    state = position.state
    step_fn = sharded_train_step(phase.model, objective, optimizer, shardings, mesh,
                                 seed=train.seed, microbatch_size=train.microbatch_size,
                                 mlm_mask_ratio=data.mlm_mask_ratio)

    # Data: the same rows for both members; this process builds its own rows only; each phase
    # its own stream (seed + phase index: a phase reading its predecessor's sources does not
    # replay them). The queue cuts full batches into the microbatches batch-size warmup asks for.
    batches = make_batch_iterator(
        data, seq_len=train.seq_len, global_batch_size=train.global_batch_size,
        seed=train.seed + index, objective=objective, tokenizer=tokenizer,
        process_index=jax.process_index(), process_count=jax.process_count())
    microbatch = train.microbatch_size or train.global_batch_size
    queue = MicrobatchQueue(batches, train.global_batch_size // microbatch)
    if position.data_state is not None:
        queue.set_state(position.data_state)
    if jax.process_index() == 0 and not (member_dir / TOKENIZER).is_dir():
        tokenizer.save(member_dir / TOKENIZER)

    # Schedules, metrics, evaluation: timed in the phase's real tokens.
    learning_rate = learning_rate_schedule(phase.schedule, peak=phase.optimizer.learning_rate,
                                           total_tokens=schedule_tokens(train))
    batch_rows = batch_size_schedule(train)
    flops_per_token = training_flops_per_token(phase.model, objective, seq_len=train.seq_len,
                                               mlm_mask_ratio=data.mlm_mask_ratio)["total"]
    meta = checkpoint_meta(phase.model, objective, tokenizer.special_tokens)
    recipe_dict = recipe_to_dict(recipe)
    step, phase_step = int(state.step), position.phase_step
    tokens, phase_tokens = position.tokens, position.phase_tokens
    label = member_dir.name if phase.name == "main" else f"{member_dir.name} {phase.name}"
    log = MetricsLog(member_dir, resume_step=step, desc=label,
                     progress=(train.steps, phase_step) if train.steps else (train.tokens,
                                                                             phase_tokens),
                     enabled=jax.process_index() == 0, tensorboard=recipe.logging.tensorboard)
    peak = peak_flops(jax.devices()[0].device_kind)
    evaluate = (make_evaluator(phase_recipe, objective, tokenizer, mesh, shardings.params,
                               batches=recipe.logging.eval_batches)
                if recipe.logging.eval_every_steps else None)

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
        while not phase_done(train, phase_step, phase_tokens):
            size = batch_rows(phase_tokens)
            batch, data_state = upcoming if upcoming is not None else load_batch(size)
            state, metrics = step_fn(state, batch, float(learning_rate(phase_tokens)))
            step += 1
            phase_step += 1
            # Build the next batch while the device computes this step, when its size is
            # already known: batches only grow, so a full batch is followed by full ones.
            prefetch = size == train.global_batch_size and phase_step != train.steps
            upcoming = load_batch(size) if prefetch else None
            metrics = jax.device_get(metrics)
            real = int(metrics["real_tokens"])
            tokens += real
            phase_tokens += real
            loss = float(metrics["loss"])
            now = time.perf_counter()
            last = phase_done(train, phase_step, phase_tokens)
            every_eval = recipe.logging.eval_every_steps
            due_eval = bool(every_eval) and (step % every_eval == 0 or last)
            if step % recipe.logging.every_steps == 0 or last or due_eval:
                seconds = now - last_time
                record = {"step": step, "phase": phase.name, "loss": loss,
                          "accuracy": float(metrics["accuracy"]),
                          "learning_rate": float(metrics["learning_rate"]),
                          "grad_norm": float(metrics["grad_norm"]), "tokens": tokens,
                          "phase_tokens": phase_tokens, "batch_rows": size,
                          "tokens_per_s": real / seconds, "step_time_s": seconds,
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
                progress = {"phase": index, "phase_name": phase.name, "phase_step": phase_step,
                            "phase_tokens": phase_tokens, "tokens": tokens,
                            "data": merged_across_processes(data_state)}
                checkpoints.save(step, state, meta=meta, recipe=recipe_dict, progress=progress)
                if last and not stopped:
                    checkpoints.mark_phase_end(step, phase.name)
            if stopped:
                break
    finally:
        log.close()
    result = MemberResult(member_dir.name, step, tokens, loss, stopped, failed)
    here = Position(index, state, phase_step, phase_tokens, tokens)
    return (here if stopped else next_phase(recipe, here, objective, mesh)), result


def _check_phases(recipe: Recipe, mesh) -> None:
    """Raises ConfigError for a phase whose batch does not split over the mesh and processes,
    or whose data sources are missing: before any training, not days into a run."""
    phases = recipe.run_phases()
    for index, phase in enumerate(phases):
        where = f"phases.{index}.train" if recipe.phases else "train"
        train, micro = phase.train, phase.train.microbatch_size or phase.train.global_batch_size
        if micro % mesh.size:
            raise ConfigError(f"{where}.global_batch_size={train.global_batch_size} with "
                              f"microbatch_size={train.microbatch_size}: each microbatch of "
                              f"{micro} rows must split over the {mesh.size} devices of the mesh "
                              f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
        if train.global_batch_size % jax.process_count():
            raise ConfigError(f"{where}.global_batch_size={train.global_batch_size} is not "
                              f"divisible by the {jax.process_count()} processes")
        data = f"phases.{index}.data" if recipe.phases else "data"
        listed = [("sources", s) for s in phase.data.sources]
        if recipe.logging.eval_every_steps:
            listed += [("heldout", s) for s in phase.data.heldout]
        for field, source in listed:
            if source_kind(source) not in ("bundled", "tfds"):
                try:
                    source_files(source)
                except SourceError as err:
                    raise ConfigError(f"{data}.{field}: {err}") from None
