"""Fine-tune a member of the pair on a downstream task, over a seed sweep.

    task, config = finetune_settings("mrpc", ["learning_rate=3e-5"])
    summary = finetune(RUN_DIR, task, config, member="encoder", seeds=5)

Each seed is one run in RUN_DIR/finetune/<task>/<member>/seed<k> (`finetune.results`) by the
shared loop (`finetune.loop`): a classification or regression run (`finetune.classification`)
or a retrieval run (`finetune.retrieval`), depending on the task. The sweep's summary (every
seed's final dev metrics, their mean, median and spread) goes to summary.json, which
`ettin-jax compare` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from ettin_jax.config.schema import MEMBERS
from ettin_jax.errors import ConfigError
from ettin_jax.finetune.classification import (
    classification_run,
    encode_task,
    start_from,
)
from ettin_jax.finetune.classification import settings_of as classification_settings
from ettin_jax.finetune.config import FinetuneConfig, sweep_seeds
from ettin_jax.finetune.loop import run_seed
from ettin_jax.finetune.metrics import summarize_seeds
from ettin_jax.finetune.results import TaskSummary, seed_dir, write_summary
from ettin_jax.finetune.retrieval import encode_retrieval, retrieval_run
from ettin_jax.finetune.retrieval import settings_of as retrieval_settings
from ettin_jax.finetune.retrieval_tasks import RetrievalTaskSpec
from ettin_jax.finetune.tasks import TaskSpec
from ettin_jax.hf.config import from_hf_config
from ettin_jax.hf.pretrained import CONFIG_FILE
from ettin_jax.inference import load_model
from ettin_jax.models.classification import check_pooling
from ettin_jax.training.checkpoint import find_members, read_objective
from ettin_jax.training.mesh import make_mesh


def finetune(source: str | Path, task: TaskSpec | RetrievalTaskSpec, config: FinetuneConfig, *,
             member: str, run_dir: str | Path | None = None, seeds: int = 1) -> TaskSummary:
    """Fine-tunes `member` ("encoder" or "decoder") of `source` (a run directory, a member or
    checkpoint directory, or a HuggingFace directory: `inference.load_model`) on `task` with
    the task's recipe, once per seed of `sweep_seeds(task, seeds)`, into
    RUN_DIR/finetune/<task>/<member>/seed<k> (RUN_DIR: `run_dir`, default `source`), and
    writes the sweep's summary.json. Seeds already done are read, not rerun; a seed
    interrupted earlier resumes from its last checkpoint. A classification task with
    `init_from_task` (Ettin starts RTE, MRPC and STS-B from MNLI) starts seed k from that
    task's fine-tuned seed k of the same member when it is there, else from the pretrained
    member (and says so). Returns the summary. Raises what reading the model or the task data
    raises (CheckpointError, TaskDataError), ConfigError for a pooling the member does not
    have, and CheckpointError for a seed started with other settings."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    run_dir = Path(source if run_dir is None else run_dir)
    model, tokenizer = load_model(source, member)
    mesh = make_mesh(config.mesh)
    if isinstance(task, RetrievalTaskSpec):
        data = encode_retrieval(task, tokenizer, objective=model.objective)
        settings = retrieval_settings(task, config)

        def make_run(index: int, seed: int):
            return retrieval_run(model, tokenizer, task, data, config, seed=seed, mesh=mesh)
    else:
        try:
            check_pooling(model.objective, config.pooling_for(model.objective))
        except ValueError as err:
            raise ConfigError(f"pooling={config.pooling}: {err}") from None
        data = encode_task(task, tokenizer, objective=model.objective)
        settings = classification_settings(task, config)

        def make_run(index: int, seed: int):
            return classification_run(model, tokenizer, task, data, config, seed=seed,
                                      mesh=mesh,
                                      start_from=start_from(run_dir, task, member, index))
    results = [run_seed(make_run(index, seed), config, mesh,
                        seed_dir(run_dir, task.name, member, index))
               for index, seed in enumerate(sweep_seeds(task, seeds))]
    per_seed = tuple(result["metrics"] for result in results)
    summary = TaskSummary(task=task.name, member=member, headline=task.metrics[0],
                          seeds=per_seed, summary=summarize_seeds(list(per_seed)),
                          settings=settings | {"source": str(source)})
    write_summary(run_dir, summary)
    return summary


def source_members(source: str | Path) -> list[str]:
    """The members `source` holds, in pair order: those of a run directory; the one member of
    a member, step or HuggingFace directory (read from its metadata, no weights loaded).
    Raises CheckpointError (MissingCheckpointError) when it holds none."""
    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        objective = from_hf_config(json.loads((path / CONFIG_FILE).read_text()),
                                   source=str(path / CONFIG_FILE))[1]
    else:
        found = find_members(path)
        if "" not in found:
            return [member for member in MEMBERS if member in found]
        objective = read_objective(found[""])
    return [member for member, of in MEMBERS.items() if of == objective]
