"""The run directory's recipe: RUN_DIR/recipe.yaml is what was really run, and a run directory
only ever continues the run it holds.

    changes = claim_run_dir(run_dir, recipe)           # first use: writes recipe.yaml
    changes = claim_run_dir(run_dir, other_recipe)     # ConfigError unless resume-compatible

A change is resume-compatible when it alters how the run is executed or observed, not what it
computes: the mesh, logging and evaluation, checkpoint cadence and retention, the attention
implementation, data loader threads, the non-finite patience. Anything else (model, data,
budgets, schedules, phases) refuses unless `force`. A run directory without any checkpoint
(a start that failed before its first save) holds nobody to its recipe: the new one replaces it.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import jax

from ettin_jax.config import Recipe, load_recipe, recipe_to_dict, recipe_to_yaml
from ettin_jax.errors import ConfigError
from ettin_jax import storage
from ettin_jax.storage import PathLike, write_text_atomically
from ettin_jax.training.checkpoint import has_checkpoints

RECIPE_FILE = "recipe.yaml"
# Dotted keys (fnmatch patterns; "*" also matches the "phases.<i>." prefix) that a resumed run
# may change.
RESUME_COMPATIBLE = (
    "mesh.*", "logging.*", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
    "*model.attention_impl", "*model.scan_layers", "*data.workers",
    "*train.max_nonfinite_steps",
)


def recipe_differences(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} of every leaf where two recipes differ; a list of
    another length (phases, sources) is one difference at the list's key."""
    differences: dict[str, tuple[Any, Any]] = {}

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for name in a.keys() | b.keys():
                walk(a.get(name), b.get(name), f"{key}.{name}" if key else name)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}.{i}")
        elif a != b:
            differences[key] = (a, b)

    walk(recipe_to_dict(old), recipe_to_dict(new), "")
    return dict(sorted(differences.items()))


def claim_run_dir(run_dir: PathLike, recipe: Recipe, *, force: bool = False
                  ) -> dict[str, tuple[Any, Any]]:
    """Makes RUN_DIR hold `recipe`: writes RUN_DIR/recipe.yaml (process 0) when there is none,
    when no checkpoint was saved under it yet, or when the one there differs only in
    resume-compatible keys (or `force`).

    Returns the differences accepted ({} for a new or identical recipe). Raises ConfigError
    naming the run directory and the differing keys when the recipe there is another one.
    """
    run_dir = storage.path(run_dir)
    path = run_dir / RECIPE_FILE
    changes: dict[str, tuple[Any, Any]] = {}
    if path.is_file() and has_checkpoints(run_dir):
        changes = recipe_differences(load_recipe(path), recipe)
        blocking = [k for k in changes
                    if not any(fnmatch.fnmatchcase(k, p) for p in RESUME_COMPATIBLE)]
        if blocking and not force:
            shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}"
                              for k in blocking[:5])
            more = f" and {len(blocking) - 5} more" if len(blocking) > 5 else ""
            raise ConfigError(
                f"{run_dir} holds a run of another recipe ({path}): {shown}{more}. These "
                f"change what the run computes; use another --run-dir, the recipe there, or "
                f"--force to continue its checkpoints with this recipe")
        if not changes:
            return changes
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, recipe_to_yaml(recipe))
    return changes
