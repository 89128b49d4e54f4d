"""What is checked before a run trains or writes anything: that every phase's batch splits over
the mesh and the processes, that its data and held-out sources exist, and that the tokenizer
fits the model. A mistake found here costs seconds, not a failed start days into a run.
"""

from __future__ import annotations

import jax

from data_pipelines.sources import SourceError, check_prepared, source_files, source_kind
from ettin_jax.config import PhaseConfig, Recipe
from ettin_jax.errors import ConfigError


def evaluates(recipe: Recipe, phase: PhaseConfig) -> bool:
    """Whether training evaluates on held-out data in `phase`: logging.eval_every_steps is
    set and the phase's data.heldout lists sources."""
    return bool(recipe.logging.eval_every_steps) and bool(phase.data.heldout)


def check_recipe_inputs(recipe: Recipe, mesh, tokenizer) -> list[str]:
    """Raises ConfigError (or MissingInputError, naming the command that creates the input)
    for a phase whose batch does not split over `mesh` and the processes, a missing data or
    held-out source, or a tokenizer larger than model.vocab_size.

    Returns notes for the user: phases trained without held-out evaluation because their
    data.heldout is empty although logging.eval_every_steps asks for it.
    """
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size "
                          f"is {recipe.model.vocab_size}")
    unevaluated = []
    for index, phase in enumerate(recipe.run_phases()):
        prefix = f"phases.{index}." if recipe.phases else ""
        _check_batch(phase, mesh, f"{prefix}train")
        read = {"sources": phase.data.sources}
        if evaluates(recipe, phase):
            read["heldout"] = phase.data.heldout
        elif recipe.logging.eval_every_steps:
            unevaluated.append(phase.name)
        for field, sources in read.items():
            for position, source in enumerate(sources):
                _check_source(source, f"{prefix}data.{field}.{position}")
    if not unevaluated:
        return []
    return [f"data.heldout is empty: training without held-out evaluation (phase "
            f"{', '.join(unevaluated)}; logging.eval_every_steps="
            f"{recipe.logging.eval_every_steps} is ignored there)"]


def _check_batch(phase: PhaseConfig, mesh, where: str) -> None:
    train = phase.train
    micro = train.microbatch_size or train.global_batch_size
    if micro is None:
        return  # sized in tokens without microbatches: rows are whole multiples of the mesh
    if micro % mesh.size:
        raise ConfigError(f"{where}.global_batch_size={train.global_batch_size} with "
                          f"microbatch_size={train.microbatch_size}: each microbatch of "
                          f"{micro} rows must split over the {mesh.size} devices of the mesh "
                          f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if train.global_batch_size is not None and train.global_batch_size % jax.process_count():
        raise ConfigError(f"{where}.global_batch_size={train.global_batch_size} is not "
                          f"divisible by the {jax.process_count()} processes")


def _check_source(source, key: str) -> None:
    kind = source_kind(source)
    if kind == "prepared":
        check_prepared(source.path, key)
    elif kind not in ("bundled", "tfds"):
        from data_pipelines.mds import read_index

        try:
            read_index(source.path) if kind == "mds" else source_files(source)
        except SourceError as err:
            raise ConfigError(f"{key}: {err}") from None
