"""`ettin-jax launch tpu`: one training run on a Cloud TPU slice, brought back after preemption.

What it does, in order (`plan_commands` lists it; `--dry-run` prints it):
1. stages: builds a wheel of this checkout (`pip wheel --no-deps`, from a copy of the working
   tree so that stale build output never enters it), and uploads it, requirements.lock and the
   resolved recipe (validated here, before any TPU is asked for) to RUN_DIR/launch/;
2. creates a queued resource (on-demand, spot or reserved) and polls it until ACTIVE;
3. installs on every worker: the wheel with its `tpu` extra into a fresh venv, every package
   at requirements.lock's version, under the lock's Python (uv fetches that Python: TPU VM
   images ship an older one);
4. runs `ettin-jax train recipe.yaml --run-dir RUN_DIR` on every worker (the same command:
   JAX finds the pod's hosts itself);
5. supervises: a preempted slice (the queued resource SUSPENDED or FAILED) or a failed ssh
   command (the job died, a worker vanished) deletes the slice and goes back to 2; the
   trainer resumes from RUN_DIR's latest complete checkpoint. It stops when the command exits
   0, or with `LaunchFailed` after --max-retries relaunches, and deletes the queued resource
   it created on every way out (Ctrl-C too).

The argv builders are pure functions; `supervise` takes the command runner and the sleep
function, so tests drive it with a fake `gcloud` and no waiting.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ettin_jax.errors import ConfigError
from ettin_jax.launch.command import shell_command, train_argv

# The software each TPU generation's VMs run (Cloud TPU's documented runtime for JAX).
DEFAULT_RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
PROVISIONING = ("on-demand", "spot", "reserved")
# uv creates the workers' venv with the lock's Python and installs the lock in seconds.
UV_VERSION = "0.13.8"
WORKER_DIR = "ettin-jax-launch"  # under the ssh user's home on every worker
STAGING_DIR = "launch"  # under RUN_DIR: the wheel, requirements.lock, recipe.yaml
RECIPE_NAME = "recipe.yaml"
LOCK_NAME = "requirements.lock"
# Queued resource states (TPU API QueuedResourceState) after which the slice will not run.
LOST_STATES = frozenset({"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"})
# Seconds without an answer from a worker after which its ssh connection counts as lost.
SSH_ALIVE_S = 600
# Consecutive failed `describe` calls after which the queued resource counts as gone.
DESCRIBE_FAILURES = 5

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ACCELERATOR = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
_LOCK_PYTHON = re.compile(r"Python (\d+\.\d+)")


class LaunchFailed(RuntimeError):
    """The run could not be completed: gcloud refused a request, or every retry was spent.
    The message is one line saying what happened last."""


@dataclasses.dataclass(frozen=True)
class TpuLaunch:
    """One launch: what to train, where, and on which slice.

    recipe: a local recipe file (.yaml/.gin); overrides: dotted key=value strings applied to it
    here (the workers get the resolved recipe). run_dir: gs://BUCKET/PATH, shared by every
    host and every relaunch. name: the queued resource and node ID. runtime_version: None
    takes DEFAULT_RUNTIMES' entry for the accelerator's generation. provisioning: on-demand,
    spot or reserved. max_retries: relaunches after a preemption or failure. poll_s: seconds
    between state polls. queue_timeout: how long the request may wait for capacity before it
    fails (gcloud's --valid-until-duration, e.g. "6h"); None waits indefinitely.
    Raises ConfigError naming the field for an invalid value."""

    recipe: str
    run_dir: str
    name: str
    zone: str
    accelerator_type: str
    overrides: tuple[str, ...] = ()
    project: str | None = None
    runtime_version: str | None = None
    provisioning: Literal["on-demand", "spot", "reserved"] = "on-demand"
    max_retries: int = 3
    poll_s: float = 30.0
    queue_timeout: str | None = None

    def __post_init__(self):
        if not self.run_dir.startswith("gs://") or len(self.run_dir.rstrip("/")) <= 5:
            raise ConfigError(
                f"--run-dir {self.run_dir!r}: a TPU pod run needs a gs://BUCKET/PATH run "
                f"directory: every host writes its part of each checkpoint there and every "
                f"relaunch resumes from it, so it must be storage all hosts share")
        if not _NAME.match(self.name):
            raise ConfigError(f"--name {self.name!r}: a queued resource name is 1-63 lowercase "
                              f"letters, digits and hyphens, starting with a letter")
        if not _ACCELERATOR.match(self.accelerator_type):
            raise ConfigError(f"--accelerator-type {self.accelerator_type!r}: expected "
                              f"GENERATION-CORES, e.g. v5p-64, v5litepod-16, v6e-8, v4-32")
        if self.runtime_version is None and self.generation not in DEFAULT_RUNTIMES:
            raise ConfigError(f"--accelerator-type {self.accelerator_type!r}: no default "
                              f"runtime for {self.generation} (known: "
                              f"{', '.join(DEFAULT_RUNTIMES)}); give --runtime-version")
        if self.provisioning not in PROVISIONING:
            raise ConfigError(f"provisioning {self.provisioning!r}: expected one of "
                              f"{', '.join(PROVISIONING)}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries {self.max_retries}: must be 0 or more")
        if self.poll_s < 0:
            raise ConfigError(f"--poll-interval {self.poll_s}: must be 0 or more")

    @property
    def generation(self) -> str:
        """The TPU generation of the accelerator type ("v5p" for "v5p-64")."""
        return _ACCELERATOR.match(self.accelerator_type).group(1)

    @property
    def runtime(self) -> str:
        """The TPU VM runtime version the slice is created with."""
        return self.runtime_version or DEFAULT_RUNTIMES[self.generation]

    @property
    def staging_url(self) -> str:
        """RUN_DIR/launch: where the wheel, the lock and the resolved recipe are uploaded."""
        return f"{self.run_dir.rstrip('/')}/{STAGING_DIR}"


# ---- gcloud command lines ----------------------------------------------------------------


def _location(launch: TpuLaunch) -> list[str]:
    return ["--zone", launch.zone] + (["--project", launch.project] if launch.project else [])


def _queued_resources(verb: str, launch: TpuLaunch) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, launch.name,
            *_location(launch)]


def create_argv(launch: TpuLaunch) -> list[str]:
    """`gcloud compute tpus queued-resources create` for the slice: one node named as the
    queued resource, with --spot or --reserved as provisioned."""
    argv = [*_queued_resources("create", launch), "--node-id", launch.name,
            "--accelerator-type", launch.accelerator_type,
            "--runtime-version", launch.runtime]
    if launch.provisioning != "on-demand":
        argv.append(f"--{launch.provisioning}")
    if launch.queue_timeout:
        argv += ["--valid-until-duration", launch.queue_timeout]
    return argv


def describe_argv(launch: TpuLaunch) -> list[str]:
    """`gcloud ... queued-resources describe` printing only the state (e.g. ACTIVE)."""
    return [*_queued_resources("describe", launch), "--format=value(state.state)"]


def delete_argv(launch: TpuLaunch, *, wait: bool) -> list[str]:
    """`gcloud ... queued-resources delete --force` (its nodes first); `wait`: until it is gone
    (before recreating the same name), else --async (the final clean-up)."""
    return [*_queued_resources("delete", launch), "--force", "--quiet",
            *([] if wait else ["--async"])]


def ssh_argv(launch: TpuLaunch, command: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running the shell `command` on every worker at once;
    its exit status is nonzero when any worker's is. A recreated slice has new host keys, so
    they are accepted rather than checked against the old ones; a connection silent for
    SSH_ALIVE_S (a worker gone without closing it) ends with an error instead of hanging."""
    alive = [f"--ssh-flag=-oServerAliveInterval={SSH_ALIVE_S // 10}",
             "--ssh-flag=-oServerAliveCountMax=10"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", launch.name, *_location(launch),
            "--worker=all", "--strict-host-key-checking=no", *alive, "--quiet",
            "--command", command]


def upload_argv(files: Sequence[str], url: str) -> list[str]:
    """`gcloud storage cp FILES URL/` ("-" as the only file: standard input to URL)."""
    return ["gcloud", "storage", "cp", *files, url]


def wheel_argv(source_dir: Path, wheel_dir: Path) -> list[str]:
    """`python -m pip wheel --no-deps` of the project in `source_dir` into `wheel_dir`, with
    this environment's setuptools (no build isolation: nothing is downloaded)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--quiet", "--wheel-dir", str(wheel_dir), str(source_dir)]


# ---- what the workers run ----------------------------------------------------------------


def install_command(launch: TpuLaunch, wheel_name: str, python: str) -> str:
    """The shell command that installs the project on a worker: downloads the staged wheel,
    lock and recipe into ~/ettin-jax-launch, makes a fresh venv with Python `python` (uv
    downloads it when the image lacks it) and installs the wheel with its `tpu` extra, every
    dependency at the lock's version."""
    staged = [f"{launch.staging_url}/{name}" for name in (wheel_name, LOCK_NAME, RECIPE_NAME)]
    steps = [
        f"mkdir -p ~/{WORKER_DIR}",
        f"cd ~/{WORKER_DIR}",
        shell_command(upload_argv(staged, ".")),
        # Ubuntu 24.04 images mark the system Python externally managed; uv goes to ~/.local.
        f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv=={UV_VERSION}",
        "rm -rf venv",
        f"python3 -m uv venv --quiet --python {python} venv",
        shell_command(["python3", "-m", "uv", "pip", "install", "--quiet", "--python",
                       "venv/bin/python", "--constraint", LOCK_NAME, f"./{wheel_name}[tpu]"]),
    ]
    return " && ".join(steps)


def run_command(launch: TpuLaunch) -> str:
    """The shell command every worker runs: `ettin-jax train recipe.yaml --run-dir RUN_DIR`
    from the venv `install_command` made, with the resolved recipe it downloaded."""
    argv = train_argv(RECIPE_NAME, launch.run_dir, executable="venv/bin/ettin-jax")
    return f"cd ~/{WORKER_DIR} && exec {shell_command(argv)}"


# ---- staging -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a launch: argv, and the text fed to its standard input (or None)."""

    argv: tuple[str, ...]
    stdin: str | None = None

    def __str__(self) -> str:
        return shell_command(self.argv)


def project_root() -> Path:
    """The source checkout this package runs from (setup.cfg and requirements.lock at its
    top). Raises ConfigError when the package is installed without one."""
    root = Path(__file__).resolve().parents[2]
    missing = [n for n in ("setup.cfg", LOCK_NAME) if not (root / n).is_file()]
    if missing:
        raise ConfigError(f"launch tpu builds the workers' wheel from a source checkout of "
                          f"ettin-jax; {root} has no {' or '.join(missing)} (run it from a "
                          f"checkout installed with `make install`)")
    return root


def wheel_name(root: Path) -> str:
    """The file name `pip wheel` gives the project in `root` (from setup.cfg)."""
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    name = config["metadata"]["name"].replace("-", "_")
    return f"{name}-{config['metadata']['version']}-py3-none-any.whl"


def lock_python(root: Path) -> str:
    """MAJOR.MINOR of the Python requirements.lock was resolved with (its header says)."""
    header = (root / LOCK_NAME).read_text().split("\n", 3)[:3]
    found = _LOCK_PYTHON.search("\n".join(header))
    if not found:
        raise ConfigError(f"{root / LOCK_NAME}: no 'Python X.Y' in its header; run make lock")
    return found.group(1)


def resolved_recipe(launch: TpuLaunch) -> str:
    """The recipe with its overrides applied and validated, as YAML: what the workers train
    (a local recipe file, or a gin file's includes, do not exist on them). Raises ConfigError
    for an invalid recipe or for a path in it that exists only on this machine."""
    from ettin_jax.config import load_recipe, recipe_to_yaml
    from ettin_jax.config.loading import recipe_to_dict

    recipe = load_recipe(launch.recipe, launch.overrides)
    for key, value in _path_values(recipe_to_dict(recipe)):
        if "://" not in value and Path(value).exists():
            raise ConfigError(
                f"recipe {launch.recipe}: {key} = {value!r} is a path on this machine, which "
                f"the TPU workers cannot read; copy it to a bucket (gcloud storage cp -r "
                f"{value} gs://BUCKET/...) and give the gs:// URL")
    return recipe_to_yaml(recipe)


_PATH_KEYS = frozenset({"path", "tokenizer", "init_from", "data_dir"})


def _path_values(tree: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string under a path-valued key of a plain recipe tree."""
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            dotted = f"{key}.{name}" if key else str(name)
            if name in _PATH_KEYS and isinstance(value, str):
                yield dotted, value
            else:
                yield from _path_values(value, dotted)
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _path_values(value, f"{key}.{index}")


def local_staging_dir(launch: TpuLaunch) -> Path:
    """This machine's scratch folder for the launch (the source copy and the built wheel)."""
    return Path(tempfile.gettempdir()) / f"ettin-jax-launch-{launch.name}"


def copy_working_tree(root: Path, dest: Path) -> Path:
    """Copies the checkout's files (git's tracked and untracked-but-not-ignored files; the
    whole tree less .git, venvs and build output when git cannot list them) to `dest`, so
    that the wheel holds exactly the working tree. Returns `dest`."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (root / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, dest / name)
    else:
        shutil.copytree(root, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "runs", "__pycache__", "*.egg-info"))
    return dest


def build_wheel(root: Path, staging: Path) -> Path:
    """Builds the wheel of the working tree in `root` into `staging`/wheel (from a copy in
    `staging`/source) and returns its path. Raises LaunchFailed when pip fails."""
    source, wheels = staging / "source", staging / "wheel"
    shutil.rmtree(staging, ignore_errors=True)
    wheels.mkdir(parents=True)
    copy_working_tree(root, source)
    built = subprocess.run(wheel_argv(source, wheels), capture_output=True, text=True)
    wheel = wheels / wheel_name(root)
    if built.returncode != 0 or not wheel.is_file():
        raise LaunchFailed(f"building the wheel failed ({shell_command(wheel_argv(source, wheels))}"
                           f"): {_last_line(built.stderr) or 'no ' + wheel.name}")
    return wheel


# ---- the plan and its supervisor ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every command of a launch. build (a local pip command) and uploads run once; then
    create, describe (repeated until ACTIVE), install, run; delete_between before a relaunch,
    cleanup at the end."""

    build: Command
    uploads: tuple[Command, ...]
    create: Command
    describe: Command
    install: Command
    run: Command
    delete_between: Command
    cleanup: Command

    def in_order(self) -> list[Command]:
        """The commands of a run without preemption, in the order they run (one describe)."""
        return [self.build, *self.uploads, self.create, self.describe, self.install, self.run,
                self.cleanup]


def plan_commands(launch: TpuLaunch, recipe_yaml: str, root: Path | None = None) -> Plan:
    """The commands of `launch`, its resolved recipe `recipe_yaml` uploaded from standard
    input, the wheel built from `root` (default: this checkout) under local_staging_dir."""
    root = root or project_root()
    staging = local_staging_dir(launch)
    wheel = wheel_name(root)
    staged = f"{launch.staging_url}/"
    return Plan(
        build=Command(tuple(wheel_argv(staging / "source", staging / "wheel"))),
        uploads=(Command(tuple(upload_argv([str(staging / "wheel" / wheel),
                                            str(root / LOCK_NAME)], staged))),
                 Command(tuple(upload_argv(["-"], staged + RECIPE_NAME)), stdin=recipe_yaml)),
        create=Command(tuple(create_argv(launch))),
        describe=Command(tuple(describe_argv(launch))),
        install=Command(tuple(ssh_argv(launch, install_command(launch, wheel,
                                                               lock_python(root))))),
        run=Command(tuple(ssh_argv(launch, run_command(launch)))),
        delete_between=Command(tuple(delete_argv(launch, wait=True))),
        cleanup=Command(tuple(delete_argv(launch, wait=False))),
    )


@dataclasses.dataclass(frozen=True)
class Completed:
    """A finished command: exit status and, where captured, its output."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Command, bool], Completed]


def run_subprocess(command: Command, capture: bool) -> Completed:
    """Runs `command`; `capture`: keep its output (else it goes to this terminal, as the
    training log does). A missing executable is exit status 127, as a shell reports it."""
    try:
        done = subprocess.run(command.argv, input=command.stdin, text=True,
                              capture_output=capture)
    except FileNotFoundError as err:
        return Completed(127, "", f"{command.argv[0]}: {err.strerror}")
    return Completed(done.returncode, done.stdout or "", done.stderr or "")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _log(message: str) -> None:
    print(f"launch tpu: {message}", file=sys.stderr, flush=True)


def wait_until_ready(plan: Plan, launch: TpuLaunch, runner: Runner,
                     sleep: Callable[[float], None], log: Callable[[str], None]) -> str:
    """Polls the queued resource every launch.poll_s seconds; returns "ACTIVE", a state in
    LOST_STATES, or "UNKNOWN" after DESCRIBE_FAILURES failed describes in a row."""
    last, failures = None, 0
    while True:
        done = runner(plan.describe, True)
        state = done.stdout.strip() if done.returncode == 0 else "UNKNOWN"
        if state != last:
            why = f" ({_last_line(done.stderr)})" if state == "UNKNOWN" else ""
            log(f"queued resource {launch.name}: {state}{why}")
            last = state
        failures = failures + 1 if state == "UNKNOWN" else 0
        if state == "ACTIVE" or state in LOST_STATES or failures >= DESCRIBE_FAILURES:
            return state
        sleep(launch.poll_s)


def supervise(launch: TpuLaunch, plan: Plan, *, runner: Runner = run_subprocess,
              sleep: Callable[[float], None] | None = None,
              log: Callable[[str], None] = _log) -> None:
    """Runs `plan`'s uploads, then create -> wait -> install -> run until the run command
    exits 0, deleting and recreating the slice after each lost slice or failed command, at
    most launch.max_retries times. Deletes the queued resource it created on every way out,
    KeyboardInterrupt included (re-raised). Raises LaunchFailed when gcloud refuses an upload
    or a create, or when the retries are spent."""
    import time

    sleep = sleep or time.sleep
    for upload in plan.uploads:
        done = runner(upload, True)
        if done.returncode != 0:
            raise LaunchFailed(f"uploading to {launch.staging_url} failed ({upload}): "
                               f"{_last_line(done.stderr)}")
    failures, created = 0, False
    try:
        while True:
            log(f"attempt {failures + 1} of {launch.max_retries + 1}: creating {launch.name} "
                f"({launch.accelerator_type}, {launch.provisioning}, {launch.zone})")
            done = runner(plan.create, True)
            if done.returncode != 0:
                raise LaunchFailed(
                    f"creating queued resource {launch.name} failed: "
                    f"{_last_line(done.stderr) or f'exit status {done.returncode}'} (one left "
                    f"from an earlier launch is removed with: {plan.delete_between})")
            created = True
            state = wait_until_ready(plan, launch, runner, sleep, log)
            if state != "ACTIVE":
                what = f"the queued resource became {state}"
            elif runner(plan.install, False).returncode != 0:
                what = "installing on the workers failed"
            elif runner(plan.run, False).returncode != 0:
                what = "the training command failed"
            else:
                log(f"the run completed: {launch.run_dir}")
                return
            if state == "ACTIVE":
                described = runner(plan.describe, True)
                what += (f" (queued resource: {described.stdout.strip()})"
                         if described.returncode == 0 else " (queued resource gone)")
            failures += 1
            if failures > launch.max_retries:
                raise LaunchFailed(f"gave up after {failures} attempts (--max-retries "
                                   f"{launch.max_retries}): {what}; the run dir "
                                   f"{launch.run_dir} keeps its checkpoints")
            log(f"{what}; deleting {launch.name} and relaunching "
                f"({launch.max_retries - failures + 1} retries left)")
            if runner(plan.delete_between, False).returncode != 0:
                log(f"deleting {launch.name} failed; creating it again may fail")
            created = False
    finally:
        if created:
            log(f"deleting {launch.name} (in the background: {plan.cleanup})")
            runner(plan.cleanup, False)


def launch_tpu(launch: TpuLaunch, *, dry_run: bool = False, runner: Runner = run_subprocess,
               sleep: Callable[[float], None] | None = None,
               log: Callable[[str], None] = _log, out: Callable[[str], None] = print) -> None:
    """Validates the recipe, then either prints every command (`dry_run`: one per line,
    shell-quoted, in the order of a run without preemption; nothing runs, nothing is written)
    or builds the wheel and runs `supervise`. Raises ConfigError for a bad recipe, LaunchFailed
    when the run could not be completed."""
    root = project_root()
    plan = plan_commands(launch, resolved_recipe(launch), root)
    if dry_run:
        for command in plan.in_order():
            out(str(command))
        return
    staging = local_staging_dir(launch)
    try:
        log(f"building the wheel of {root}")
        build_wheel(root, staging)
        supervise(launch, plan, runner=runner, sleep=sleep, log=log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
