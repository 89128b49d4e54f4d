"""Train the members of an Ettin pair: recipe -> mesh -> data -> state -> steps -> checkpoints.

    train_pair(recipe, run_dir)          # RUN_DIR/encoder and RUN_DIR/decoder, same rows

Each member resumes where its checkpoints say (`ettin_jax.training.resume`), so the losses
after a crash or kill are the ones an uninterrupted run would give. A phase is a short set-up
and a loop: take a batch (made ahead on a thread, `batches.py`), run the step, hand the step to
the hooks (`hooks.py`: evaluation, metrics, progress, checkpoints). Between the steps where the
run looks at its metrics the host never waits for the device (`train_phase`). SIGTERM
(preemption) stops at the next step boundary after saving.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time

import jax
from etils.epath import Path
from jax.experimental import multihost_utils

from data_pipelines.pipeline import load_data_tokenizer
from ettin_jax import storage
from ettin_jax.config import PhaseConfig, Recipe, member_of, recipe_to_dict
from ettin_jax.models.config import Objective
from ettin_jax.models.describe import training_flops_per_token
from ettin_jax.training.batch_sizing import phase_batch_sizes, sized_recipe
from ettin_jax.training.batches import PhaseBatches
from ettin_jax.training.checkpoint import MEMBERS, TOKENIZER, TrainCheckpointer, checkpoint_meta
from ettin_jax.training.distributed import tell_user
from ettin_jax.training.evaluation import make_evaluator
from ettin_jax.training.hooks import (
    StepHooks,
    StepInfo,
    advance_progress,
    evaluate_heldout,
    log_metrics,
    save_checkpoint,
)
from ettin_jax.training.mesh import make_mesh
from ettin_jax.training.metrics import MetricsLog, peak_flops, read_metrics
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.phases import Position, next_phase, recipe_members
from ettin_jax.training.preflight import check_recipe_inputs, evaluates
from ettin_jax.training.resume import resume_position
from ettin_jax.training.run_dir import claim_run_dir
from ettin_jax.training.schedules import learning_rate_schedule, schedule_tokens
from ettin_jax.training.state import init_state_shardings
from ettin_jax.training.step import sharded_train_step
from ettin_jax.training.wandb_logging import MemberWandb, member_wandb


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


def train_pair(recipe: Recipe, run_dir: storage.PathLike, *, only: str | None = None,
               force: bool = False) -> dict[str, MemberResult]:
    """Trains the recipe's members (train.objectives, or `only` "encoder"/"decoder") into
    RUN_DIR/<member>, each through every phase, after checking the recipe's inputs
    (`preflight`). Writes RUN_DIR/recipe.yaml; refuses a run dir whose checkpoints belong to
    another recipe unless the change is resume-compatible or `force` (`run_dir`)."""
    run_dir = storage.path(run_dir)
    members = recipe_members(recipe, only)
    tokenizer = load_data_tokenizer(recipe.data)
    mesh = make_mesh(recipe.mesh)
    for note in check_recipe_inputs(recipe, mesh, tokenizer):
        tell_user(note)
    changes = claim_run_dir(run_dir, recipe, force=force)
    if changes:
        tell_user(f"{run_dir}: continuing with changed " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    recipe = _sized(recipe, tokenizer, mesh)
    results = {}
    with _Preemption() as preemption:
        for member in members:
            results[member] = train_member(recipe, MEMBERS[member], run_dir / member,
                                           tokenizer=tokenizer, mesh=mesh, preemption=preemption)
            if results[member].stopped:  # preempted or diverged: the next member waits
                break
    return results


def train_member(recipe: Recipe, objective: Objective, member_dir: Path, *, tokenizer,
                 mesh=None, preemption: _Preemption | None = None) -> MemberResult:
    """Trains one member through the recipe's phases (one phase when it lists none), each
    until its train.steps or train.tokens, from where `resume_position` says, with the
    member's own phase changes (`Recipe.for_member`). Phases sized in tokens get their rows
    first (`batch_sizing`). `mesh`: the recipe's mesh (made here when None)."""
    mesh = make_mesh(recipe.mesh) if mesh is None else mesh
    recipe = recipe.for_member(member_of(objective))
    if any(phase.train.global_batch_size is None for phase in recipe.run_phases()):
        recipe = _sized(recipe, tokenizer, mesh)
    if jax.process_index() == 0 and not (member_dir / TOKENIZER).is_dir():
        tokenizer.save(member_dir / TOKENIZER)
    with TrainCheckpointer(member_dir, recipe.checkpoint) as checkpoints:
        with jax.transfer_guard("allow"):  # restoring (the steps themselves never wait)
            position = resume_position(recipe, objective, mesh, checkpoints)
            step = int(position.state.step)
        logged = read_metrics(member_dir)  # a finished run reports its last logged loss
        result = MemberResult(member_dir.name, step, position.tokens,
                              logged[-1]["loss"] if logged else None)
        with member_wandb(recipe, member_dir, logged=logged) as wandb_run:  # None: no W&B
            while position.phase < len(recipe.run_phases()) and not result.stopped:
                position, result = train_phase(recipe, position, objective, member_dir, mesh,
                                               checkpoints, tokenizer=tokenizer,
                                               preemption=preemption, wandb_run=wandb_run)
            if wandb_run is not None:
                wandb_run.end(result)
    return result


def train_phase(recipe: Recipe, position: Position, objective: Objective, member_dir: Path,
                mesh, checkpoints: TrainCheckpointer, *, tokenizer,
                preemption: _Preemption | None = None,
                wandb_run: MemberWandb | None = None) -> tuple[Position, MemberResult]:
    """Runs phase `position.phase` from `position` to its end (-> the next phase's start) or
    until it stops early (preemption, divergence); `wandb_run`: the member's W&B run, which
    gets the metrics records and the phase's end.

    The host never waits for the device between steps: batches are made ahead on a thread
    (`batches.PhaseBatches`, which also counts their tokens), the step computes its own
    learning rate, and the step's metrics stay on the device until the run looks at them:
    every logging.every_steps steps, when a hook that reads the device is due (evaluation,
    checkpoint), and at the phase's last step. A look reads every step's metrics since the
    previous look, so an MLM packing overflow or a run of non-finite updates between looks is
    still caught (the run stops at the look; skipped updates changed nothing meanwhile).
    """
    index = position.phase
    phase = recipe.run_phases()[index]
    train = phase.train
    with jax.transfer_guard("allow"):  # set-up: compiling, initial values, the evaluator
        optimizer = make_optimizer(phase.optimizer)
        shardings = init_state_shardings(phase.model, objective, optimizer, mesh)
        learning_rate = learning_rate_schedule(phase.schedule,
                                               peak=phase.optimizer.learning_rate,
                                               total_tokens=schedule_tokens(train))
        step_fn = sharded_train_step(phase.model, objective, optimizer, shardings, mesh,
                                     seed=train.seed, learning_rate=learning_rate,
                                     microbatch_size=train.microbatch_size,
                                     max_microbatch_size=train.max_microbatch_size,
                                     mlm_mask_ratio=phase.data.mlm_mask_ratio)
        label = member_dir.name if phase.name == "main" else f"{member_dir.name} {phase.name}"
        state, step = position.state, int(position.state.step)
        log = MetricsLog(member_dir, resume_step=step, desc=label,
                         progress=(train.steps, position.phase_step) if train.steps
                         else (train.tokens, position.phase_tokens),
                         enabled=jax.process_index() == 0,
                         tensorboard=recipe.logging.tensorboard)
        if wandb_run is not None:
            log = wandb_run.tee(log)
        hooks = _phase_hooks(recipe, phase, index, objective, mesh, shardings, checkpoints,
                             log, tokenizer)
    tokens = position.tokens
    info, pending = None, []
    looked = (time.perf_counter(), step, tokens)  # when, at which step and token count
    try:
        with PhaseBatches(phase, index, objective, tokenizer, mesh,
                          phase_step=position.phase_step, phase_tokens=position.phase_tokens,
                          data_state=position.data_state, label=member_dir.name) as batches:
            for batch in batches:
                state, device_metrics = step_fn(state, batch.arrays)
                pending.append(device_metrics)
                step, tokens = step + 1, tokens + batch.tokens
                info = StepInfo(step, batch.phase_step, tokens, batch.phase_tokens, state,
                                None, batch.rows, batch.tokens, 0.0, 0, 0, batch.data_state,
                                last=batch.last)
                info.stopped = _preempted(info, preemption)
                if (info.stopped or info.last or hooks.waits_after(info)
                        or step % recipe.logging.every_steps == 0):
                    with jax.transfer_guard("allow"):
                        looked_at = jax.device_get(pending)
                    pending = []
                    now = time.perf_counter()
                    info.metrics = looked_at[-1]
                    info.seconds = now - looked[0]
                    info.interval_steps, info.interval_tokens = step - looked[1], \
                        tokens - looked[2]
                    looked = (now, step, tokens)
                    failure = _failure(looked_at, step, phase)
                    if failure:
                        info.stopped, info.failed = failure, True
                hooks.run(info)
                if info.stopped:
                    break
    finally:
        log.close(failed=sys.exc_info()[0] is not None)
    loss = float(info.metrics["loss"]) if info is not None else None
    result = MemberResult(member_dir.name, step, tokens, loss,
                          info.stopped if info else None, info.failed if info else False)
    here = Position(index, state, info.phase_step if info else position.phase_step,
                    info.phase_tokens if info else position.phase_tokens, tokens)
    if result.stopped:
        return here, result
    if wandb_run is not None:
        wandb_run.phase_end(index, phase.name, result)
    with jax.transfer_guard("allow"):
        return next_phase(recipe, here, objective, mesh), result


def _sized(recipe: Recipe, tokenizer, mesh) -> Recipe:
    """`recipe` with the rows of its phases sized in tokens (measured on their data), said."""
    sizes = phase_batch_sizes(recipe, tokenizer=tokenizer, row_multiple=mesh.size)
    for phase, size in zip(recipe.run_phases(), sizes):
        if phase.train.global_batch_tokens is not None:
            tell_user(f"phase {phase.name}: {size.rows} rows of {size.seq_len} per step hold "
                      f"~{size.tokens_per_step:,} real tokens (train.global_batch_tokens="
                      f"{phase.train.global_batch_tokens:,}; packing fills "
                      f"{size.packing_fill:.1%} of the row slots)")
    return sized_recipe(recipe, sizes)


def _phase_hooks(recipe: Recipe, phase: PhaseConfig, index: int, objective: Objective, mesh,
                 shardings, checkpoints: TrainCheckpointer, log: MetricsLog,
                 tokenizer) -> StepHooks:
    """What happens after a step of `phase`: held-out evaluation, the metrics record, the
    progress bar, the checkpoint (also after a step that stops the run)."""
    logging = recipe.logging
    hooks = StepHooks()
    if evaluates(recipe, phase):
        evaluate = make_evaluator(recipe.phase_recipe(phase), objective, tokenizer, mesh,
                                  shardings.params, batches=logging.eval_batches)
        hooks.every(logging.eval_every_steps, evaluate_heldout(evaluate), waits=True)
    flops = training_flops_per_token(phase.model, objective, seq_len=phase.train.seq_len,
                                     mlm_mask_ratio=phase.data.mlm_mask_ratio)["total"]
    hooks.every(logging.every_steps,
                log_metrics(log, phase=phase.name, flops_per_token=flops,
                            peak_flops=peak_flops(jax.devices()[0].device_kind),
                            devices=mesh.size),
                also=lambda info: bool(info.extra), waits=True)
    hooks.every(1, advance_progress(log, by_tokens=not phase.train.steps))
    hooks.every(recipe.checkpoint.every_steps,
                save_checkpoint(checkpoints, phase_index=index, phase=phase.name,
                                meta=checkpoint_meta(phase.model, objective,
                                                     tokenizer.special_tokens),
                                recipe=recipe_to_dict(recipe)),
                also=lambda info: info.stopped, waits=True)
    hooks.every(recipe.checkpoint.every_steps, lambda info: log.flush(),
                also=lambda info: info.stopped)
    return hooks


def _preempted(info: StepInfo, preemption: _Preemption | None) -> str | None:
    """Why the run stops after this step for a preemption notice, or None. Asks the notice at
    every step, on every process (host values only)."""
    if preemption is not None and preemption.reached(info.step):
        return f"preempted (SIGTERM) at step {info.step}"
    return None


def _failure(metrics: list[dict], step: int, phase: PhaseConfig) -> str | None:
    """Why the run stops after `step` for a training failure seen in the metrics of the
    steps up to it since the previous look (host numbers, in order), or None."""
    first = step - len(metrics) + 1
    for offset, record in enumerate(metrics):
        if record.get("mlm_overflow", 0) > 0:
            return (f"stopped at step {step}: {int(record['mlm_overflow'])} masked tokens of "
                    f"step {first + offset} did not fit the MLM head's packing capacity for "
                    f"data.mlm_mask_ratio={phase.data.mlm_mask_ratio} (update skipped): the data "
                    f"masks far more tokens than its ratio, beyond the capacity's margin for "
                    f"random (bernoulli) masking")
    limit = phase.train.max_nonfinite_steps
    if max(int(record["nonfinite_streak"]) for record in metrics) >= limit:
        return (f"stopped at step {step}: {limit} updates in a row had a non-finite loss or "
                f"gradient (skipped)")
    return None


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
