"""How a fine-tuning run executes, beside what the task prescribes.

A task (`finetune.tasks.TaskSpec`) carries the fine-tuning recipe: epochs, batch size, learning
rate and its schedule, weight decay, Adam moments, max length, seeds (Ettin's GLUE settings for
the presets). `FinetuneConfig` holds the rest: the head's pooling and dropout, evaluation,
logging and checkpoint cadence, the mesh. One command line sets both with key=value
(`split_overrides` sends each key to its owner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ettin_jax.config.loading import override_config
from ettin_jax.config.schema import MeshConfig, OptimizerConfig
from ettin_jax.errors import ConfigError, did_you_mean
from ettin_jax.finetune.retrieval_tasks import (
    RETRIEVAL_OVERRIDE_KEYS,
    RETRIEVAL_PRESETS,
    RetrievalTaskSpec,
    resolve_retrieval_task,
)
from ettin_jax.finetune.tasks import OVERRIDE_KEYS, TaskSpec, resolve_task

DEFAULT_POOLING = {"mlm": "cls", "clm": "last"}  # transformers' defaults for each member's class


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of a fine-tuning run that the task does not prescribe (key=value each).

    pooling: how a sequence is summarised (None: the member's default for the task kind:
    classification `cls` for the encoder, `last` for the decoder, as transformers' classes;
    retrieval the task's, `mean` and `lasttoken` in Ettin's runs; also `mean` for either, and
    for retrieval `cls` (encoder) and `weightedmean` (decoder)). classifier_dropout: between head
    and classifier. eval_batch_size: rows per evaluation call. logging_every_steps: metrics
    cadence. checkpoint_every_steps: save cadence (None: at every epoch's end; the dev set is
    evaluated there too). mesh: devices as in training (default: data parallel over all).
    """

    pooling: str | None = None
    classifier_dropout: float = 0.0
    eval_batch_size: int = 64
    logging_every_steps: int = 10
    checkpoint_every_steps: int | None = None
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=-1, fsdp=1))

    def __post_init__(self) -> None:
        checks = [(0 <= self.classifier_dropout < 1,
                   f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}"),
                  (self.eval_batch_size >= 1,
                   f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
                  (self.logging_every_steps >= 1,
                   f"logging_every_steps must be >= 1, got {self.logging_every_steps}"),
                  (self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
                   f"checkpoint_every_steps must be >= 1 or null, got "
                   f"{self.checkpoint_every_steps}")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def pooling_for(self, objective: str) -> str:
        """The classification pooling used for a member of `objective`."""
        return self.pooling or DEFAULT_POOLING[objective]


RUN_KEYS = tuple(f.name for f in dataclasses.fields(FinetuneConfig))


RETRIEVAL_PREFIX = "retrieval:"


def finetune_settings(task_name: str, overrides: Sequence[str] = ()
                      ) -> tuple[TaskSpec | RetrievalTaskSpec, FinetuneConfig]:
    """The task named `task_name` and the run settings, with "key=value" `overrides` applied
    to whichever owns each key (a task setting such as learning_rate=3e-5, seeds=19,8364 or
    data_dir=DIR; a run setting such as pooling=mean or mesh.data=4).

    task_name: a classification or regression task (`tasks.resolve_task`: a preset or a task
    file), or a retrieval task: "retrieval:" and a retrieval preset or task file
    (`retrieval_tasks.resolve_retrieval_task`; the retrieval presets also without the
    prefix). Raises ConfigError naming an unknown task or key, or a bad value."""
    retrieval = task_name.startswith(RETRIEVAL_PREFIX) or task_name in RETRIEVAL_PRESETS
    name = task_name.removeprefix(RETRIEVAL_PREFIX)
    task_overrides, run_overrides = split_overrides(
        overrides, RETRIEVAL_OVERRIDE_KEYS if retrieval else OVERRIDE_KEYS)
    try:
        task = (resolve_retrieval_task(name, task_overrides) if retrieval
                else resolve_task(name, task_overrides))
    except ValueError as err:  # tasks word their errors as ValueError
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from None
    config = override_config(FinetuneConfig(), run_overrides,
                             source=f"fine-tuning settings of {task.name}")
    return task, config


def split_overrides(overrides: Sequence[str], task_keys: Sequence[str] = OVERRIDE_KEYS
                    ) -> tuple[dict[str, str], list[str]]:
    """({task key: value text}, [run "key=value"]) from command-line overrides; `task_keys`:
    the keys the task takes. Raises ConfigError for text without "=" or a key neither owns."""
    task: dict[str, str] = {}
    run: list[str] = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {text!r} is not of the form key=value")
        top = key.split(".")[0]
        if top in RUN_KEYS:
            run.append(text)
        elif key in task_keys:
            task[key] = value
        else:
            valid = sorted(set(task_keys) | set(RUN_KEYS))
            raise ConfigError(f"override {text!r}: unknown setting {key!r}."
                              f"{did_you_mean(key, valid)} Valid: {', '.join(valid)}")
    return task, run


def sweep_seeds(task: TaskSpec, count: int) -> tuple[int, ...]:
    """The seeds of a sweep of `count` runs: the task's own (Ettin's per GLUE task) first,
    then consecutive seeds after the largest of them."""
    seeds = list(task.seeds[:count])
    while len(seeds) < count:
        seeds.append(max(seeds + list(task.seeds)) + 1)
    return tuple(seeds)


def optimizer_config(task: TaskSpec) -> OptimizerConfig:
    """The task's optimizer for `training.optimizer.make_optimizer`: AdamW with its moments,
    its decay expressed for that AdamW (p *= 1 - lr_t * wd) so that it decays as Composer's
    DecoupledAdamW, which Ettin's GLUE jobs use (p *= 1 - (lr_t / peak) * weight_decay)."""
    return OptimizerConfig(name="adamw", learning_rate=task.learning_rate, b1=task.adam_b1,
                           b2=task.adam_b2, eps=task.adam_eps,
                           weight_decay=task.weight_decay / task.learning_rate)


def task_settings(task: TaskSpec) -> dict[str, Any]:
    """The task's fine-tuning recipe as plain values (what a run records and resumes with)."""
    fields = ("epochs", "batch_size", "learning_rate", "weight_decay", "warmup_fraction",
              "final_lr_fraction", "adam_b1", "adam_b2", "adam_eps", "max_length")
    return {name: getattr(task, name) for name in fields}

