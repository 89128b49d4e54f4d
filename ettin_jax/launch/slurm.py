"""`ettin-jax launch slurm`: one sbatch script that trains a recipe on every node of a SLURM
allocation and brings the job back after its time limit or a preemption.

    job = SlurmJob(recipe="recipe.yaml", run_dir="/shared/runs/r1", nodes=4, gpus_per_node=8)
    script = render_script(job, recipe_copy=...)     # pure: the text of the sbatch script
    job_id = submit(job)                             # copies the recipe, writes, `sbatch`

The script runs one task per node (`srun` with --ntasks-per-node=1), each `ettin-jax train` on
the same recipe copy and run directory; `jax.distributed.initialize()` (called by the trainer
when SLURM_NTASKS > 1) reads SLURM's variables itself: the coordinator is the first node of
SLURM_STEP_NODELIST on port 61440 + SLURM_JOB_ID % 4096 (or $JAX_COORDINATOR_PORT), process ids
from SLURM_PROCID. Preemption and time limits:

- `--signal=B:USR1@WARN` sends the batch shell USR1 WARN seconds before the time limit (or at a
  preemption, where the cluster sets PreemptParameters=send_user_signal). The script sends the
  training tasks SIGTERM (`scancel --signal=TERM JOB`: to the tasks, not to `srun`, which
  answers SIGTERM with SIGKILL to its tasks); the trainer saves at its next step and exits 0.
  The script waits for the step, then `scontrol requeue`s the job while SLURM_RESTART_COUNT <
  max_requeues.
- SIGTERM to the batch shell (a preemption, or `scancel`) reaches the tasks from SLURM too; the
  script only waits for them to save. SLURM itself requeues a preempted `--requeue` job where
  PreemptMode=REQUEUE, and a cancelled one stays cancelled (requeueing on SIGTERM would undo
  every `scancel`), as submitit and Lightning do.
- A requeued job reruns the same command; the trainer resumes from the run directory's latest
  checkpoint. `--open-mode=append` keeps one log per job id across its restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ettin_jax.errors import ConfigError
from ettin_jax.launch.command import shell_command, train_argv

# The batch shell's warning before the time limit, in seconds: enough for a large model's
# checkpoint to reach a bucket; SLURM may send it up to 60 s earlier than asked.
DEFAULT_WARN_SECONDS = 300
DEFAULT_MAX_REQUEUES = 10
LAUNCH_SUBDIR = "slurm"
# Options the launcher writes itself, and the launcher option that sets each.
_OWN_OPTIONS = {
    "--job-name": "--job-name", "-J": "--job-name", "--nodes": "--nodes", "-N": "--nodes",
    "--ntasks-per-node": "(one task per node, fixed)", "--ntasks": "--nodes", "-n": "--nodes",
    "--gpus-per-node": "--gpus-per-node", "--cpus-per-task": "--cpus-per-task",
    "-c": "--cpus-per-task", "--partition": "--partition", "-p": "--partition",
    "--account": "--account", "-A": "--account", "--time": "--time", "-t": "--time",
    "--requeue": "(always set)", "--no-requeue": "(the launcher requeues)",
    "--signal": "--warn-seconds", "--open-mode": "(always append)", "--output": "--launch-dir",
    "-o": "--launch-dir", "--error": "--launch-dir", "-e": "--launch-dir",
    "--chdir": "(the directory you launch from)", "-D": "(the directory you launch from)",
    # GPUs come through --gpus-per-node only: the script must tell JAX how many each process
    # drives (JAX_LOCAL_DEVICE_IDS), or JAX's SLURM detection gives it one.
    "--gpus": "--gpus-per-node", "-G": "--gpus-per-node", "--gpus-per-task": "--gpus-per-node",
}
# Values that go on #SBATCH lines and into paths SLURM expands: no blanks, quotes or `%`.
_PLAIN = re.compile(r"^[A-Za-z0-9_.,:+@/=-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SlurmError(ConfigError):
    """A launcher argument that cannot work, or a failed `sbatch`/`squeue`; the message names
    the option and value (or the command and what it printed)."""


def default_executable() -> str:
    """The `ettin-jax` beside this Python (this virtualenv's, which the nodes see on a shared
    filesystem), else plain `ettin-jax` for the nodes' PATH."""
    beside = Path(sys.executable).parent / "ettin-jax"
    return str(beside) if beside.is_file() else "ettin-jax"


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What `ettin-jax launch slurm` submits.

    recipe: the recipe file (copied next to the script, as the compute nodes may not see it).
    run_dir: a shared path or a URL (gs://, s3://); the same for every node and every restart.
    launch_dir: where the script, the recipe copy and the log go, on a filesystem the nodes
    share (default RUN_DIR/slurm for a local run directory; required for a URL).
    workdir: the job's working directory (relative paths in the recipe resolve there).
    executable: the `ettin-jax` command the nodes run (a shared virtualenv's bin/ettin-jax).
    train_options: more `ettin-jax train` options (e.g. --only encoder).
    sbatch_options: more sbatch options, each one word (e.g. --mem=0, --exclusive).
    setup: shell lines run before the training (e.g. `module load cuda`).
    env: (NAME, value) pairs exported to every task.
    """

    recipe: str
    run_dir: str
    nodes: int
    overrides: tuple[str, ...] = ()
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    job_name: str | None = None
    max_requeues: int = DEFAULT_MAX_REQUEUES
    warn_seconds: int = DEFAULT_WARN_SECONDS
    launch_dir: str | None = None
    workdir: str = dataclasses.field(default_factory=os.getcwd)
    executable: str = dataclasses.field(default_factory=default_executable)
    train_options: tuple[str, ...] = ()
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def parse_env(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """NAME=VALUE strings (--env) as (NAME, VALUE) pairs; raises SlurmError for one without
    `=` or with a NAME that is not a variable name."""
    pairs = []
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not _ENV_KEY.match(name):
            raise SlurmError(f"--env {item!r}: write NAME=VALUE with a variable name")
        pairs.append((name, value))
    return tuple(pairs)


def is_url(path: str) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    return bool(_URL.match(path))


def resolved_job(job: SlurmJob) -> SlurmJob:
    """`job` checked, with absolute local paths, its job name and launch directory filled in.

    Raises SlurmError naming the option and value at fault, and ConfigError for a recipe or
    override that does not load (checked here, before anything waits in a queue)."""
    from ettin_jax.config import load_recipe

    _check_numbers(job)
    workdir = Path(job.workdir).resolve()
    recipe = Path(job.recipe)
    recipe = recipe if recipe.is_absolute() else workdir / recipe
    if not recipe.is_file():
        raise SlurmError(f"RECIPE {job.recipe!r}: no such file (the launcher copies the recipe "
                         f"file for the nodes)")
    load_recipe(recipe, job.overrides)
    run_dir = job.run_dir if is_url(job.run_dir) else str(_absolute(job.run_dir, workdir))
    if job.launch_dir is not None:
        if is_url(job.launch_dir):
            raise SlurmError(f"--launch-dir {job.launch_dir!r}: must be a local directory the "
                             f"compute nodes share (SLURM writes the log there)")
        launch_dir = str(_absolute(job.launch_dir, workdir))
    elif is_url(run_dir):
        raise SlurmError(f"--run-dir {run_dir!r} is a URL: give --launch-dir DIR, a directory "
                         f"the compute nodes share, for the script, the recipe copy and the log")
    else:
        launch_dir = str(Path(run_dir) / LAUNCH_SUBDIR)
    job_name = job.job_name or _default_job_name(run_dir)
    checks = {"--job-name": (job_name, _NAME), "--partition": (job.partition, _PLAIN),
              "--account": (job.account, _PLAIN), "--launch-dir": (launch_dir, _PLAIN),
              "the working directory": (str(workdir), _PLAIN)}
    for option, (value, pattern) in checks.items():
        if value is not None and not pattern.match(value):
            raise SlurmError(f"{option} {value!r}: no blanks, quotes, % or shell characters "
                             f"(it goes on an #SBATCH line)")
    for name, _ in job.env:
        if not _ENV_KEY.match(name):
            raise SlurmError(f"--env {name!r}: not an environment variable name")
    for option in job.sbatch_options:
        _check_sbatch_option(option)
    return dataclasses.replace(job, recipe=str(recipe), run_dir=run_dir, launch_dir=launch_dir,
                               job_name=job_name, workdir=str(workdir))


def _check_numbers(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise SlurmError(f"--nodes {job.nodes}: must be at least 1")
    for option, value in (("--gpus-per-node", job.gpus_per_node),
                          ("--cpus-per-task", job.cpus_per_task)):
        if value is not None and value < 1:
            raise SlurmError(f"{option} {value}: must be at least 1")
    if job.max_requeues < 0:
        raise SlurmError(f"--max-requeues {job.max_requeues}: must be 0 or more")
    if not 1 <= job.warn_seconds <= 65535:
        raise SlurmError(f"--warn-seconds {job.warn_seconds}: must be 1 to 65535 (SLURM's "
                         f"--signal range)")
    if job.time is not None:
        limit = time_limit_seconds(job.time)
        if limit is not None and limit <= job.warn_seconds:
            raise SlurmError(f"--time {job.time} ({limit} s) leaves no training before the "
                             f"warning {job.warn_seconds} s ahead of it: raise --time or lower "
                             f"--warn-seconds")


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a SLURM --time value: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes or days-hours:minutes:seconds; None for UNLIMITED/INFINITE.
    Raises SlurmError for anything else."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match or value.endswith("-"):
        raise SlurmError(f"--time {value!r}: not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, "
                         f"D-HH:MM or D-HH:MM:SS)")
    days, first, second, third = match.groups()
    if days is not None:
        seconds = ((int(days) * 24 + int(first)) * 60 + int(second or 0)) * 60 + int(third or 0)
    elif third is not None:
        seconds = (int(first) * 60 + int(second)) * 60 + int(third)
    else:
        seconds = int(first) * 60 + int(second or 0)
    if seconds == 0:
        raise SlurmError(f"--time {value!r}: a zero time limit")
    return seconds


def _check_sbatch_option(option: str) -> None:
    if not option.startswith("-") or any(ch.isspace() for ch in option):
        raise SlurmError(f"--sbatch-option {option!r}: one sbatch option per --sbatch-option, "
                         f"written as --name=value")
    name, _, value = option.partition("=")
    if name == "--gres" and "gpu" in value:
        raise SlurmError(f"--sbatch-option {option!r}: give GPUs with --gpus-per-node (the "
                         f"script then lets each node's process drive all of them)")
    if name in _OWN_OPTIONS:
        raise SlurmError(f"--sbatch-option {option!r}: the launcher sets {name} itself "
                         f"(use {_OWN_OPTIONS[name]})")


def _absolute(path: str, workdir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else workdir / path


def _default_job_name(run_dir: str) -> str:
    tail = run_dir.rstrip("/").rsplit("/", 1)[-1]
    return "ettin-" + (re.sub(r"[^A-Za-z0-9_.-]", "-", tail) or "run")


def recipe_copy_name(recipe_text: bytes, suffix: str) -> str:
    """The name of a recipe's copy in the launch directory: recipe-<content hash><suffix>, so a
    relaunch with an edited recipe never changes what an already queued job reads."""
    return f"recipe-{hashlib.sha256(recipe_text).hexdigest()[:12]}{suffix}"


def srun_argv(job: SlurmJob, recipe_copy: str) -> list[str]:
    """The training step: one task per node on every node of the allocation, each running
    `ettin-jax train RECIPE_COPY overrides --run-dir RUN_DIR [train options]` (no coordinator
    options: JAX reads SLURM's variables); a task that fails ends the step (its peers would
    otherwise wait for it)."""
    return ["srun", f"--nodes={job.nodes}", f"--ntasks={job.nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            *train_argv(recipe_copy, job.run_dir, job.overrides, executable=job.executable,
                        options=job.train_options)]


def sbatch_lines(job: SlurmJob) -> list[str]:
    """The script's #SBATCH lines, for a `resolved_job`."""
    options = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node is not None:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task is not None:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    for name, value in (("partition", job.partition), ("account", job.account),
                        ("time", job.time)):
        if value is not None:
            options.append(f"--{name}={value}")
    options += ["--requeue", f"--signal=B:USR1@{job.warn_seconds}", "--open-mode=append",
                f"--output={job.launch_dir}/slurm-%j.out", f"--chdir={job.workdir}",
                *job.sbatch_options]
    return [f"#SBATCH {option}" for option in options]


def render_script(job: SlurmJob, recipe_copy: str) -> str:
    """The sbatch script of a `resolved_job` whose recipe was copied to `recipe_copy`.

    Guarantees: one task per node; USR1 (the time-limit warning) stops the step with SIGTERM
    and requeues the job while SLURM_RESTART_COUNT < max_requeues; SIGTERM to the shell only
    waits for the step; the script exits with the step's status otherwise."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in job.env]
    if job.gpus_per_node is not None:
        # JAX's SLURM detection gives each process the one GPU numbered SLURM_LOCALID; our one
        # process per node drives all of its node's GPUs.
        ids = ",".join(str(i) for i in range(job.gpus_per_node))
        exports.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
    srun = srun_argv(job, recipe_copy)
    if job.cpus_per_task is not None:
        # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05).
        srun.insert(1, f"--cpus-per-task={job.cpus_per_task}")
    setup = [*job.setup, *exports]
    return "\n".join([
        "#!/bin/bash",
        "# Written by `ettin-jax launch slurm`; the job reruns this script when requeued.",
        *sbatch_lines(job),
        "",
        "set -u",
        *(["", *setup] if setup else []),
        "export PYTHONUNBUFFERED=1",
        "",
        f"max_requeues={job.max_requeues}",
        "restarts=${SLURM_RESTART_COUNT:-0}",
        "warned= interrupted=",
        'say() { echo "ettin-jax launch slurm: job ${SLURM_JOB_ID} (start $((restarts + 1))):'
        ' $*"; }',
        "on_warning() {  # time limit or preemption ahead: stop the step at its next save",
        "  interrupted=1 warned=1",
        '  say "SIGUSR1: stopping the training after its next step, with a checkpoint"',
        "  # SIGTERM to the tasks themselves (not to srun, which would SIGKILL them); scancel",
        "  # leaves this shell alone.",
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "on_term() {  # preemption or scancel: SLURM signals the tasks itself",
        "  interrupted=1",
        '  say "SIGTERM: waiting for the training to save and stop"',
        "}",
        "trap on_warning USR1",
        "trap on_term TERM",
        'say "${SLURM_JOB_NUM_NODES:-?} nodes (${SLURM_JOB_NODELIST:-?}), $(date -u +%FT%TZ)"',
        "",
        shell_command(srun) + " &",
        "step_pid=$!",
        "status=",
        'while [ -z "$status" ]; do  # a trapped signal ends `wait` early: wait again',
        "  interrupted=",
        '  wait "$step_pid"',
        "  code=$?",
        '  if [ -z "$interrupted" ]; then status=$code; fi',
        "done",
        "",
        'if [ -n "$warned" ]; then',
        '  if [ "$restarts" -lt "$max_requeues" ]; then',
        '    say "training stopped (status $status); requeueing, requeue $((restarts + 1)) of'
        ' $max_requeues"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    say "scontrol requeue failed"',
        "    exit 1",
        "  fi",
        '  say "training stopped (status $status); not requeued: all $max_requeues requeues'
        ' spent (launch again to continue the run)"',
        "  exit 75",
        "fi",
        'say "training ended with status $status"',
        'exit "$status"',
        "",
    ])


def sbatch_argv(script: str) -> list[str]:
    """`sbatch --parsable SCRIPT`: prints JOB_ID or JOB_ID;CLUSTER."""
    return ["sbatch", "--parsable", script]


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Runs `argv`, capturing its output as text; raises SlurmError when the program is
    missing."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise SlurmError(f"{argv[0]}: not found on PATH (run the launcher on a SLURM login "
                         f"node)") from error


@dataclasses.dataclass(frozen=True)
class Launch:
    """What `prepare` decided: the resolved job, and the paths and text it writes."""

    job: SlurmJob
    recipe_copy: str
    script_path: str
    script: str
    sbatch: tuple[str, ...]


def prepare(job: SlurmJob) -> Launch:
    """The launch of `job` (resolved and checked) without touching the disk: the recipe copy's
    path, the script's path and text, the sbatch command. Raises SlurmError / ConfigError."""
    job = resolved_job(job)
    recipe = Path(job.recipe)
    copy = str(Path(job.launch_dir) / recipe_copy_name(recipe.read_bytes(), recipe.suffix))
    script_path = str(Path(job.launch_dir) / f"{job.job_name}.sbatch")
    return Launch(job, copy, script_path, render_script(job, copy),
                  tuple(sbatch_argv(script_path)))


def queued_jobs(job_name: str, runner: Runner = run_command) -> list[str]:
    """Ids of this user's jobs named `job_name` that are pending or running (`squeue`).
    Raises SlurmError when squeue fails."""
    argv = ["squeue", "--me", "--noheader", f"--name={job_name}", "--format=%i"]
    result = runner(argv)
    if result.returncode != 0:
        raise SlurmError(f"{shlex.join(argv)} failed (status {result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()}")
    return result.stdout.split()


def submit(launch: Launch, runner: Runner = run_command, *, allow_running: bool = False
           ) -> str:
    """Writes the recipe copy and the script into the launch directory and submits the script
    with `sbatch --parsable`; returns the job id.

    Refuses (SlurmError) while a job of the same name is queued or running, as two jobs would
    write the same run directory, unless `allow_running`; and when sbatch fails, with what it
    printed."""
    name = launch.job.job_name
    if not allow_running:
        running = queued_jobs(name, runner)
        if running:
            raise SlurmError(f"job {', '.join(running)} named {name!r} is already queued or "
                             f"running; two jobs would write the same run directory (scancel "
                             f"it, or pass --job-name or --allow-running)")
    Path(launch.job.launch_dir).mkdir(parents=True, exist_ok=True)
    if not Path(launch.recipe_copy).exists():
        shutil.copyfile(launch.job.recipe, launch.recipe_copy)
    Path(launch.script_path).write_text(launch.script)
    result = runner(launch.sbatch)
    if result.returncode != 0:
        raise SlurmError(f"{shlex.join(launch.sbatch)} failed (status {result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()}")
    job_id = result.stdout.strip().split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmError(f"{shlex.join(launch.sbatch)} printed {result.stdout.strip()!r}, not "
                         f"a job id")
    return job_id
