"""Held-out evaluation: loss, perplexity and accuracy (MLM: of the masked tokens; CLM: of the
next token) on fixed held-out batches, during training and for `ettin-jax eval RUN_DIR`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from data_pipelines.pipeline import make_batch_iterator
from data_pipelines.tokenizers import load_tokenizer
from ettin_jax import storage
from ettin_jax.config import Recipe, load_recipe, override_recipe
from ettin_jax.errors import CheckpointError, ConfigError
from ettin_jax.models.config import Objective
from ettin_jax.training.batch_sizing import phase_batch_size, sized_recipe
from ettin_jax.training.checkpoint import (
    MEMBERS,
    find_members,
    restore_progress,
    restore_weights,
)
from ettin_jax.training.mesh import (
    batch_sharding,
    compute_sharding,
    kernel_sharding,
    make_mesh,
)
from ettin_jax.training.run_dir import RECIPE_FILE
from ettin_jax.training.state import model_graph, params_shardings
from ettin_jax.training.step import make_eval_step

Evaluator = Callable[[dict], dict[str, float]]

# Held-out MLM batches mask 15% whatever the training phase's ratio (30% or 15%), as Ettin's: every
# encoder config (JHU-CLSP/ettin-encoder-vs-decoder pretraining/configs/standard/*/**/encoder_*.yaml)
# sets `eval_loader: dataset: mlm_probability: 0.15`, "We always evaluate at 15% masking for
# consistent comparison"; so eval losses compare across phases.
EVAL_MLM_MASK_RATIO = 0.15


def heldout_batches(recipe: Recipe, objective: Objective, tokenizer, *,
                    batches: int) -> list[dict]:
    """The first `batches` held-out batches (numpy, this process's rows): data.heldout at
    train.seq_len, seed train.seed, chunking and masking mode as data says, MLM masks at
    EVAL_MLM_MASK_RATIO."""
    train = recipe.train
    heldout = dataclasses.replace(recipe.data, sources=recipe.data.heldout)
    stream = make_batch_iterator(
        heldout, seq_len=train.seq_len, global_batch_size=train.global_batch_size,
        seed=train.seed, objective=objective, tokenizer=tokenizer,
        mask_ratio=EVAL_MLM_MASK_RATIO,
        process_index=jax.process_index(), process_count=jax.process_count())
    return [next(stream) for _ in range(batches)]


def make_evaluator(recipe: Recipe, objective: Objective, tokenizer, mesh, params_sharding, *,
                   batches: int) -> Evaluator:
    """evaluate(params) -> {eval_loss, eval_perplexity, eval_accuracy, eval_targets} on the
    same `batches` held-out batches (`heldout_batches`: MLM masks at EVAL_MLM_MASK_RATIO,
    whatever the phase's ratio) every time: built once, masks fixed, so successive evaluations
    compare."""
    train = recipe.train
    rows = batch_sharding(mesh)
    fixed = [{k: jax.make_array_from_process_local_data(rows, v) for k, v in batch.items()}
             for batch in heldout_batches(recipe, objective, tokenizer, batches=batches)]
    step = jax.jit(make_eval_step(
        model_graph(recipe.model, objective), microbatch_size=train.microbatch_size,
        max_microbatch_size=train.max_microbatch_size,
        compute_shardings=jax.tree.map(compute_sharding, params_sharding),
        mlm_mask_ratio=EVAL_MLM_MASK_RATIO if objective == "mlm" else None,
        sharded_over=kernel_sharding(mesh)), in_shardings=(params_sharding, rows))

    def evaluate(params) -> dict[str, float]:
        sums = [jax.device_get(step(params, batch)) for batch in fixed]
        targets = sum(float(s["targets"]) for s in sums)
        loss = sum(float(s["loss_sum"]) for s in sums) / max(targets, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
                "eval_accuracy": sum(float(s["correct"]) for s in sums) / max(targets, 1.0),
                "eval_targets": int(targets)}

    return evaluate


def evaluate_run(run_dir: storage.PathLike, *, batches: int | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Evaluates the latest complete checkpoint of each member in RUN_DIR on its recipe's
    held-out data, with the settings (sequence length, chunking) of the phase that checkpoint
    belongs to, MLM masks at EVAL_MLM_MASK_RATIO; `batches` defaults to logging.eval_batches;
    `overrides` (key=value) change that phase's recipe for this evaluation (e.g. data.heldout).

    Returns {member: {step, phase, eval_loss, eval_perplexity, eval_accuracy, eval_targets}}.
    Raises CheckpointError / ConfigError naming the run directory when it holds no run, and
    ConfigError when the phase has no held-out data.
    """
    run_dir = storage.path(run_dir)
    members = find_members(run_dir)
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise CheckpointError(f"{run_dir}: no {RECIPE_FILE}; eval takes a run directory that "
                              f"`ettin-jax train` wrote")
    run_recipe = load_recipe(recipe_file)
    results = {}
    for member, member_dir in members.items():
        objective = MEMBERS[member]
        recipe = run_recipe.for_member(member)
        restored = restore_weights(member_dir)
        phases = recipe.run_phases()
        phase = phases[min(restore_progress(member_dir, restored.step).get("phase", 0),
                           len(phases) - 1)]
        settings = override_recipe(recipe.phase_recipe(phase), overrides,
                                   source=f"{recipe_file} (phase {phase.name!r})")
        if not settings.data.heldout:
            raise ConfigError(
                f"{recipe_file}: data.heldout is empty (phase {phase.name!r}): there is nothing "
                f"to evaluate on; name held-out documents, e.g. `ettin-jax eval {run_dir} "
                f"'data.heldout=[{{path: FILE.jsonl}}]'`")
        mesh = make_mesh(settings.mesh)
        sharding = params_shardings(settings.model, objective, mesh)
        params = jax.device_put(nnx.to_pure_dict(nnx.state(restored.model, nnx.Param)), sharding)
        tokenizer = load_tokenizer(restored.tokenizer_dir)
        # A batch sized in tokens takes the rows training took (the same measured fill).
        size = phase_batch_size(settings.run_phases()[0], phases.index(phase),
                                tokenizer=tokenizer, row_multiple=mesh.size, measure="all")
        settings = sized_recipe(settings, [size])
        evaluate = make_evaluator(settings, objective, tokenizer, mesh, sharding,
                                  batches=batches or settings.logging.eval_batches)
        results[member] = {"step": restored.step, "phase": phase.name, **evaluate(params)}
    return results
