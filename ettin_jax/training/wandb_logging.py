"""Weights & Biases logging of a member's run, when the recipe sets `logging.wandb`.

    with member_wandb(recipe, member_dir, logged=read_metrics(member_dir)) as wandb_run:
        log = wandb_run.tee(log)          # each metrics.jsonl record also goes to W&B
        wandb_run.phase_end(index, phase.name, result)
        wandb_run.end(result)             # a stop (preemption, failure) is said, then finish

`member_wandb` gives None unless the recipe sets logging.wandb, and on every process but 0.

One W&B run per member of a run directory: its id is a hash of the run directory (an absolute
local path or a URL, normalised) and the member (`wandb_run_id`), opened with resume="allow",
so a resumed or relaunched job (another host, another slice) continues the same W&B run. Its
config is the member's resolved recipe; its step is the trainer's step, and each logged record
is the dict metrics.jsonl gets (held-out metrics included). At a phase's end the history gets
`phase_end` (the phase's index) at its last step and the summary `phase_end/<name>` (index,
step, tokens, loss); with `alerts`, a W&B alert too.

A resumed trainer restarts from its checkpoint, before steps that W&B may already hold, and W&B
refuses steps below its last one. Those steps are not logged again (the resumed steps are
bit-identical to the first ones): records up to the later of the last step W&B holds (an online
run resumed: its starting step - 1) and the last step metrics.jsonl held when the member
started (an offline run knows nothing of the earlier ones) are skipped.

W&B's local files go to $WANDB_DIR when set, else into the run directory when it is local, else
(a gs:// or s3:// run directory) into a local cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from ettin_jax import storage
from ettin_jax.config import Recipe, recipe_to_dict
from ettin_jax.config.schema import WandbConfig
from ettin_jax.errors import ConfigError

PHASE_END = "phase_end"  # the history key marking a phase's last step


def normalised_location(run_dir: str | os.PathLike) -> str:
    """The run directory as the W&B run id hashes it: a URL with its scheme in lower case and
    no doubled or trailing slashes; a local path (or file:// URL) absolute, symlinks resolved.
    The same directory named differently (relative, trailing slash) gives the same text."""
    text = str(run_dir)
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() != "file":
        parts = [part for part in rest.split("/") if part]
        return f"{scheme.lower()}://{'/'.join(parts)}"
    local = rest if sep else text
    return os.path.realpath(os.path.expanduser(local))


def wandb_run_id(run_dir: str | os.PathLike, member: str) -> str:
    """The W&B run id of `member`'s run in `run_dir`: "<member>-" and 16 hex digits of the
    sha256 of the normalised run directory and the member. Deterministic: every launch of the
    same run directory (relaunched, resumed, on another host) gets the same id."""
    digest = hashlib.sha256(f"{normalised_location(run_dir)}\n{member}".encode()).hexdigest()
    return f"{member}-{digest[:16]}"


def run_name(config: WandbConfig, run_dir: str | os.PathLike, member: str) -> str:
    """The W&B run name: "<logging.wandb.name or the run directory's last component>-<member>"."""
    base = config.name or normalised_location(run_dir).rstrip("/").rsplit("/", 1)[-1]
    return f"{base}-{member}"


def local_files_dir(run_dir: str | os.PathLike) -> str:
    """Where W&B writes its local files (in a wandb/ folder there): $WANDB_DIR when set, else
    the run directory when it is local, else ettin-jax's cache directory ($XDG_CACHE_HOME or
    ~/.cache, then ettin-jax/wandb). Read at every call: W&B itself reads its environment once
    per process."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    if not storage.is_remote(run_dir):
        return normalised_location(run_dir)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ettin-jax", "wandb")


def last_logged_step(records: list[dict[str, Any]], starting_step: int) -> int:
    """The last step W&B may already hold for a member: the later of the last step of
    `records` (metrics.jsonl as the member found it, before a resume drops what follows the
    checkpoint) and `starting_step` - 1 (W&B's first step of a resumed online run; 0 for a new
    or offline one). 0 when nothing was logged."""
    logged = max((int(record["step"]) for record in records), default=0)
    return max(logged, starting_step - 1, 0)


class MemberWandb:
    """An open W&B run of one member (from `member_wandb`): logs records from `first_step` on,
    phase ends, and the end of the run."""

    def __init__(self, run: Any, *, first_step: int, alerts: bool):
        self.run = run
        self.first_step = first_step
        self._alerts = alerts
        self._finished = False

    def log_record(self, record: dict[str, Any]) -> None:
        """Logs one metrics record (a dict with "step") at W&B step record["step"], unless
        W&B may hold that step already (before `first_step`)."""
        step = int(record["step"])
        if step >= self.first_step:
            self.run.log(dict(record), step=step)

    def tee(self, log: Any) -> _TeeLog:
        """A metrics log that writes every record to `log` (a `metrics.MetricsLog`) and then
        to this run; otherwise it is `log`."""
        return _TeeLog(log, self)

    def phase_end(self, index: int, name: str, result: Any) -> None:
        """Marks the end of phase `index` (`name`) after `result` (a `trainer.MemberResult`:
        step, tokens, loss): `phase_end`=index in the history at that step (unless W&B held it
        already), `phase_end/<name>` in the summary, an alert when configured."""
        if result.step >= self.first_step:
            self.run.log({PHASE_END: index}, step=result.step)
        self.run.summary[f"{PHASE_END}/{name}"] = {
            "index": index, "step": result.step, "tokens": result.tokens, "loss": result.loss}
        if self._alerts:
            self.run.alert(title=f"{self.run.name}: phase {name} done"[:63],
                           text=f"phase {index} ({name}) ended at step {result.step}, "
                                f"{result.tokens:,} tokens, loss {result.loss}",
                           level="INFO")

    def end(self, result: Any) -> None:
        """Finishes the run after `result` (a `trainer.MemberResult`). A stopped run has its
        reason in the summary (`stopped`), an alert when configured, and exit code 1; a
        preemption (a stop that is no failure) also marks the run preempting, so W&B shows it
        as such until the relaunch resumes it."""
        if result.stopped:
            self.run.summary["stopped"] = result.stopped
            if not result.failed:
                self.run.mark_preempting()
            if self._alerts:
                self.run.alert(title=f"{self.run.name}: stopped"[:63], text=result.stopped,
                               level="ERROR" if result.failed else "WARN")
        self.finish(exit_code=1 if result.stopped else 0)

    def finish(self, exit_code: int = 0) -> None:
        """Finishes the run (once; later calls do nothing)."""
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)


class _TeeLog:
    """A metrics log (`metrics.MetricsLog`'s interface) that also logs its records to W&B."""

    def __init__(self, log: Any, wandb_run: MemberWandb):
        self._log = log
        self._wandb_run = wandb_run

    def log(self, record: dict[str, Any]) -> None:
        self._log.log(record)
        self._wandb_run.log_record(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


def import_wandb():
    """The wandb module. Raises ConfigError naming logging.wandb and the extra to install when
    it is missing."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(f"logging.wandb is set but wandb cannot be imported ({err}); install "
                          f"it with: pip install 'ettin-jax[wandb]'") from None
    return wandb


def open_run(config: WandbConfig, recipe: Recipe, run_dir: str | os.PathLike, member: str,
             *, logged: list[dict[str, Any]]) -> MemberWandb:
    """Opens (or resumes) `member`'s W&B run of `run_dir` as `config` says, with the resolved
    `recipe` as its config; `logged`: metrics.jsonl's records as the member found them."""
    wandb = import_wandb()
    directory = local_files_dir(run_dir)
    Path(directory).mkdir(parents=True, exist_ok=True)
    name, run_id = run_name(config, run_dir, member), wandb_run_id(run_dir, member)
    try:
        run = wandb.init(
            project=config.project, entity=config.entity, id=run_id, name=name,
            group=config.group or name.removesuffix(f"-{member}"), tags=[*config.tags, member],
            notes=config.notes, mode=config.mode, dir=directory,
            config=recipe_to_dict(recipe), resume="allow")
    except wandb.Error as err:  # not logged in, W&B unreachable, a refused project
        raise ConfigError(
            f"logging.wandb: W&B cannot open run {run_id} ({name}) of {run_dir}: {err} (W&B "
            f"logs in with `wandb login` or WANDB_API_KEY; or set logging.wandb.mode=offline "
            f"and upload the run's files later with `wandb sync`)") from err
    first = last_logged_step(logged, run.starting_step) + 1
    return MemberWandb(run, first_step=first, alerts=config.alerts)


@contextlib.contextmanager
def member_wandb(recipe: Recipe, member_dir: str | os.PathLike, *,
                 logged: list[dict[str, Any]]) -> Iterator[MemberWandb | None]:
    """The W&B run of the member trained in MEMBER_DIR (RUN_DIR/<member>) while the block
    runs: None when the recipe has no logging.wandb or on processes other than 0. `logged`:
    the member's metrics.jsonl records as it found them (`metrics.read_metrics`), read before
    a resume drops those past its checkpoint. The run finishes when the block ends (exit code
    1 when it raises), unless `MemberWandb.end` finished it already."""
    config = recipe.logging.wandb
    if config is None or jax.process_index() != 0:
        yield None
        return
    run_dir, _, member = str(member_dir).rstrip("/").rpartition("/")
    opened = open_run(config, recipe, run_dir or ".", member, logged=logged)
    try:
        yield opened
    except BaseException:
        opened.finish(exit_code=1)
        raise
    opened.finish()
