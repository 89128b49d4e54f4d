"""Where a member's run starts: the one place that decides what a run resumes from.

    position = resume_position(recipe, objective, mesh, checkpoints)

- No checkpoint: step 0 of the first phase, from a fresh initialisation or from
  `checkpoint.init_from`'s weights (weights only, fresh optimizer: cross-objective training).
- Checkpoints: the newest readable one, in the phase and at the step it was written (the next
  phase's start when it ended its phase). A checkpoint that cannot be read (a truncated or
  missing file after a storage fault) is named, set aside (moved, never deleted: see
  `TrainCheckpointer.set_aside`) and the next newest is tried.
- A checkpoint of another architecture or objective is refused, naming the fields: that is a
  recipe mistake, not damage, and nothing is set aside for it.
"""

from __future__ import annotations

from ettin_jax.config import Recipe
from ettin_jax.errors import CheckpointError, first_line
from ettin_jax.models.config import (
    PHASE_MODEL_FIELDS,
    RUNTIME_MODEL_FIELDS,
    Objective,
    model_differences,
)
from ettin_jax.training.checkpoint import TrainCheckpointer, forget_failed_reads, restore_weights
from ettin_jax.training.distributed import any_process, tell_user
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.phases import Position, next_phase, phase_done
from ettin_jax.training.state import abstract_state, init_state, init_state_shardings


def resume_position(recipe: Recipe, objective: Objective, mesh,
                    checkpoints: TrainCheckpointer) -> Position:
    """The position a run of `recipe` goes on from (see the module docstring). Tells the user
    (stderr, process 0) of every checkpoint set aside and the step resumed from after one was.
    Raises CheckpointError for a checkpoint of another model or objective, or one
    whose phase the recipe does not have."""
    label = checkpoints.member_dir.name
    set_aside = False
    while (step := checkpoints.latest_step()) is not None:
        position, damage = None, None
        try:
            position = _restore(recipe, objective, mesh, checkpoints, step)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to read the files is damage
            damage = first_line(err, innermost=True)
        if damage is not None:
            forget_failed_reads()
        if any_process(damage is not None):
            where = checkpoints.set_aside(step)
            tell_user(f"{label}: checkpoint {step} cannot be read "
                      f"({damage or 'another process could not read it'}); set aside as {where}")
            set_aside = True
            continue
        if set_aside:
            tell_user(f"{label}: resuming from checkpoint {step}, the newest readable one")
        return position
    if set_aside:
        tell_user(f"{label}: no readable checkpoint is left; starting afresh")
    first = recipe.run_phases()[0]
    state, _ = init_state(first.model, objective, make_optimizer(first.optimizer), mesh,
                          seed=first.train.seed, params=_initial_params(recipe, objective))
    return Position(0, state)


def _restore(recipe: Recipe, objective: Objective, mesh, checkpoints: TrainCheckpointer,
             step: int) -> Position:
    """The position of checkpoint `step` (the next phase's start when it ended its phase)."""
    phases = recipe.run_phases()
    progress = checkpoints.restore_progress(step)
    index = progress.get("phase", 0)
    if index >= len(phases):
        raise CheckpointError(f"{checkpoints.member_dir} holds phase {index} but the recipe "
                              f"has {len(phases)} phase(s)")
    phase = phases[index]
    checkpoints.check_compatible(step, phase.model, objective)
    optimizer = make_optimizer(phase.optimizer)
    shardings = init_state_shardings(phase.model, objective, optimizer, mesh)
    target = abstract_state(shardings, phase.model, objective, optimizer)
    state, _, _ = checkpoints.restore(step, target)
    position = Position(index, state, progress.get("phase_step", step),
                        progress.get("phase_tokens", progress["tokens"]), progress["tokens"],
                        progress["data"])
    if phase_done(phase.train, position.phase_step, position.phase_tokens):
        checkpoints.mark_phase_end(step, phase.name)  # if a kill came between save and mark
        return next_phase(recipe, position, objective, mesh)
    return position


def _initial_params(recipe: Recipe, objective: Objective):
    """Weights of checkpoint.init_from (weights-only restore), or None for a fresh init."""
    if recipe.checkpoint.init_from is None:
        return None
    restored = restore_weights(recipe.checkpoint.init_from)
    differ = model_differences(restored.model.config, recipe.run_phases()[0].model,
                               ignore=RUNTIME_MODEL_FIELDS + PHASE_MODEL_FIELDS)
    if differ:
        raise CheckpointError(f"checkpoint.init_from {recipe.checkpoint.init_from} holds another "
                              f"architecture than model.* of the recipe: {', '.join(differ)}")
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(restored.model))

