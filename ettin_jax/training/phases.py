"""Phases of a member's run and the plan of a whole run.

A run goes through the recipe's phases in order (`Recipe.run_phases`). Where it stands is a
`Position`: the phase, how far into it, and the train state. A phase ends when it reaches its
budget; the next one starts from its final state with the reset rules of `PhaseConfig`: same
parameters and step count, the optimizer state kept (or fresh for `optimizer_state: reset`),
its own data stream, schedule and batch-size warmup from its token 0. Where a restarted run
goes on from is decided in `ettin_jax.training.resume`.

`run_plan` is what `ettin-jax train --dry-run` prints: every member's phases, resolved, with
budgets and training FLOPs, without compiling anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ettin_jax.config import PhaseConfig, Recipe, TrainConfig, member_of, recipe_to_dict
from ettin_jax.errors import ConfigError
from ettin_jax.models.config import Objective
from ettin_jax.models.describe import describe_pair, training_flops_per_token
from ettin_jax.training.batch_sizing import estimated_steps, phase_batch_sizes
from ettin_jax.training.checkpoint import MEMBERS
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import TrainState, at_phase_tokens, init_state


def phase_named(recipe: Recipe, name: str) -> PhaseConfig:
    """The phase of `recipe` called `name`. Raises ConfigError listing the phase names."""
    names = [phase.name for phase in recipe.run_phases()]
    if name not in names:
        raise ConfigError(f"no phase {name!r} in the recipe; its phases: {', '.join(names)}")
    return recipe.run_phases()[names.index(name)]


def recipe_members(recipe: Recipe, only: str | None = None) -> list[str]:
    """The members a run of `recipe` trains ("encoder" for mlm, "decoder" for clm, in that
    order), or just `only`. Raises ConfigError for an unknown `only`."""
    if only is not None:
        if only not in MEMBERS:
            raise ConfigError(f"--only must be one of {', '.join(MEMBERS)}, got {only!r}")
        return [only]
    return [m for m, objective in MEMBERS.items() if objective in recipe.train.objectives]


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a member's run stands: in which phase, how far into it, and the state to go on
    from (data_state None: the phase's data starts from the beginning)."""

    phase: int
    state: TrainState
    phase_step: int = 0
    phase_tokens: int = 0
    tokens: int = 0
    data_state: dict | None = None


def phase_done(train: TrainConfig, phase_step: int, phase_tokens: int) -> bool:
    """Whether a phase with budget `train` (steps and/or real tokens) is over after
    `phase_step` steps and `phase_tokens` tokens of it."""
    return ((train.steps is not None and phase_step >= train.steps)
            or (train.tokens is not None and phase_tokens >= train.tokens))


def next_phase(recipe: Recipe, position: Position, objective: Objective, mesh) -> Position:
    """Step 0 of the phase after `position`'s: the same parameters and step count; the
    optimizer state kept, or fresh when the phase says `optimizer_state: reset`."""
    index, state = position.phase + 1, position.state
    phases = recipe.run_phases()
    if index < len(phases) and phases[index].optimizer_state == "reset":
        phase = phases[index]
        fresh, _ = init_state(phase.model, objective, make_optimizer(phase.optimizer), mesh,
                              seed=phase.train.seed, params=state.params)
        state = fresh.replace(step=state.step)
    return Position(index, at_phase_tokens(state, 0), tokens=position.tokens)


def run_plan(recipe: Recipe, *, only: str | None = None) -> dict[str, Any]:
    """What training `recipe` does, without compiling: {"members": {member: {"objective",
    "recipe" (the member's resolved recipe), "phases": [{name, kind, tokens, max_steps,
    seq_len, global_batch_size (rows), global_batch_tokens (asked, or null), packing_fill,
    tokens_per_step and steps (real tokens of a full batch and optimizer steps of the phase,
    through batch-size warmup), estimated (true when the packing fill is assumed because the
    data cannot be read yet; then estimate_note says so), peak and final learning rate, RoPE
    thetas, mask ratio (encoder), optimizer_state, train_flops (tokens x training FLOPs per
    token, when the phase has a token budget)}]}}, "describe": the first phase's describe_pair
    report}. The packing fill is measured on each phase's data where it can be read."""
    sizes = phase_batch_sizes(recipe, measure="all")
    members = {}
    for member in recipe_members(recipe, only):
        objective = MEMBERS[member]
        phases = []
        for phase, size in zip(recipe.for_member(member).run_phases(), sizes):
            train, schedule = phase.train, phase.schedule
            peak = phase.optimizer.learning_rate
            per_token = training_flops_per_token(phase.model, objective, seq_len=train.seq_len,
                                                 mlm_mask_ratio=phase.data.mlm_mask_ratio)
            entry = {
                "name": phase.name, "kind": phase.kind, "tokens": train.tokens,
                "max_steps": train.steps, "seq_len": train.seq_len,
                "global_batch_size": size.rows,
                "global_batch_tokens": train.global_batch_tokens,
                "packing_fill": round(size.packing_fill, 4),
                "tokens_per_step": size.tokens_per_step,
                "steps": estimated_steps(train, size),
                "estimated": not size.fill_measured,
                "learning_rate_start": peak * schedule.start,
                "learning_rate_end": peak * (schedule.start if schedule.kind == "constant"
                                             or schedule.decay_tokens == 0 else schedule.floor),
                "global_rope_theta": phase.model.global_rope_theta,
                "local_rope_theta": phase.model.local_rope_theta,
                "optimizer_state": phase.optimizer_state,
                "train_flops": None if train.tokens is None else per_token["total"] * train.tokens,
            }
            if not size.fill_measured:
                entry["estimate_note"] = (
                    f"packing fill assumed {size.packing_fill:.0%}: the phase's data cannot be "
                    f"read yet; rows, tokens_per_step and steps are estimates")
            if objective == "mlm":
                entry["mlm_mask_ratio"] = phase.data.mlm_mask_ratio
            phases.append(entry)
        members[member] = {"objective": objective,
                           "recipe": recipe_to_dict(_member_recipe(recipe, objective)),
                           "phases": phases}
    first = recipe.run_phases()[0]
    return {"members": members,
            "describe": describe_pair(first.model, seq_len=first.train.seq_len,
                                      mlm_mask_ratio=first.data.mlm_mask_ratio)}


def format_run_plan(plan: dict[str, Any]) -> str:
    """The phase table of every member in `run_plan`'s report."""
    lines = []
    for member, entry in plan["members"].items():
        lines.append(f"{member} ({entry['objective']}):")
        lines.append(f"  {'phase':<12}{'kind':<11}{'tokens':>10}{'steps':>10}{'seq':>6}"
                     f"{'rows':>6}{'tokens/step':>12}{'fill':>6}{'LR start -> end':>20}"
                     f"{'RoPE g/l':>16}{'mask':>6}{'optimizer':>11}{'train FLOPs':>13}")
        for p in entry["phases"]:
            lr = f"{p['learning_rate_start']:.3g} -> {p['learning_rate_end']:.3g}"
            rope = f"{p['global_rope_theta']:.0f}/{p['local_rope_theta']:.0f}"
            mask = f"{p['mlm_mask_ratio']:.2f}" if "mlm_mask_ratio" in p else "-"
            flops = "-" if p["train_flops"] is None else f"{p['train_flops']:.3g}"
            mark = "~" if p["estimated"] else ""
            lines.append(f"  {p['name']:<12}{p['kind'] or '-':<11}{_count(p['tokens']):>10}"
                         f"{mark + _count(p['steps']):>10}{p['seq_len']:>6}"
                         f"{mark + str(p['global_batch_size']):>6}"
                         f"{mark + _count(p['tokens_per_step']):>12}"
                         f"{mark + format(p['packing_fill'], '.0%'):>6}"
                         f"{lr:>20}{rope:>16}{mask:>6}{p['optimizer_state']:>11}{flops:>13}")
        if any(p["estimated"] for p in entry["phases"]):
            lines.append("  ~ estimated: the packing fill is assumed where a phase's data "
                         "cannot be read yet (prepare it, then dry-run again to measure)")
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value >= 100_000 else str(value)


def _member_recipe(recipe: Recipe, objective: Objective) -> Recipe:
    """`recipe` as the run of one member: its own phase changes applied
    (`Recipe.for_member`), train.objectives = (objective,) everywhere."""
    def only(train):
        return dataclasses.replace(train, objectives=(objective,))

    recipe = recipe.for_member(member_of(objective))
    return dataclasses.replace(
        recipe, train=only(recipe.train),
        phases=tuple(dataclasses.replace(p, train=only(p.train)) for p in recipe.phases))
