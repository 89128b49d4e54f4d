"""The `ettin-jax train` command line that a launcher runs on every host of a job.

Every host runs the same command: JAX finds the other hosts itself (TPU pod metadata, SLURM
variables), and the trainer resumes from the run directory's latest complete checkpoint, so a
relaunch after preemption is the same command again.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def train_argv(recipe: str, run_dir: str, overrides: Sequence[str] = (), *,
               executable: str = "ettin-jax", options: Sequence[str] = ()) -> list[str]:
    """The argv of `ettin-jax train RECIPE [key=value ...] --run-dir RUN_DIR [options]`.

    recipe: the recipe file as the hosts see it; overrides: dotted key=value strings, passed on
    in order; executable: the `ettin-jax` entry point on the hosts (e.g. a venv's bin/ettin-jax);
    options: further `train` options (e.g. ["--only", "encoder"]). Returns a new list; nothing
    is quoted (see `shell_command`)."""
    return [executable, "train", recipe, *overrides, "--run-dir", run_dir, *options]


def shell_command(argv: Sequence[str]) -> str:
    """`argv` as one POSIX shell command line, every word quoted where it needs to be (what an
    ssh command, an sbatch script or a dry run prints)."""
    return shlex.join(argv)
