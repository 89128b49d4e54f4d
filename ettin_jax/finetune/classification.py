"""Sequence classification and regression runs: a member with transformers' classification
head (`models.classification`), trained on a task's examples (`finetune.tasks`,
`data_pipelines.task_data`) by the shared loop (`finetune.loop`), scored with the task's
metrics on its dev split (and MNLI's mismatched one) at every epoch's end, exported as
`ModernBertForSequenceClassification` / `ModernBertDecoderForSequenceClassification`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines.task_data import encode_examples, read_examples
from ettin_jax.config.loading import recipe_to_dict
from ettin_jax.finetune.config import FinetuneConfig, optimizer_config, task_settings
from ettin_jax.finetune.loop import Batch, SeedRun, map_rows, pad_rows, round_up
from ettin_jax.finetune.metrics import compute_metrics
from ettin_jax.finetune.results import RESULTS_FILE, seed_dir
from ettin_jax.finetune.tasks import TaskSpec
from ettin_jax.hf.classification import load_classifier, save_classifier
from ettin_jax.models.classification import (
    EXPORTABLE_POOLINGS,
    EttinClassifier,
    HeadConfig,
    classifier_from_backbone,
)
from ettin_jax.models.transformer import EttinModel
from ettin_jax.hf.transfer import HF_DIR
from ettin_jax.training.checkpoint import TOKENIZER, checkpoint_meta
from ettin_jax.training.distributed import tell_user



@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's encoded splits for one member: arrays of `encode_examples` (input_ids,
    attention_mask, labels) of the train split and of every evaluated split (the task's
    dev_split first), and the label names (None: regression)."""

    train: Batch
    evaluated: Mapping[str, Batch]
    labels: tuple[str, ...] | None

    @property
    def regression(self) -> bool:
        """Whether the task predicts one real value."""
        return self.labels is None


def encode_task(task: TaskSpec, tokenizer, *, objective: str) -> TaskData:
    """`task`'s train split and evaluated splits read and encoded for a member of `objective`
    at the task's max_length."""
    def encoded(split: str) -> Batch:
        return encode_examples(read_examples(task, split), tokenizer, objective=objective,
                               max_length=task.max_length)

    evaluated = {split: encoded(split) for split in (task.dev_split, *task.extra_dev_splits)}
    return TaskData(train=encoded(task.train_split), evaluated=evaluated, labels=task.labels)


def classification_run(model: EttinModel, tokenizer, task: TaskSpec, data: TaskData,
                       config: FinetuneConfig, *, seed: int, mesh,
                       start_from: Path | None = None) -> SeedRun:
    """The run of `model` with a fresh classification head (init from `seed`) on `data`, as
    the loop takes it. `start_from`: a fine-tuned classifier directory whose backbone and head
    (not its classifier) the run starts from (Ettin starts RTE, MRPC and STS-B from MNLI).
    Metrics: the dev split's by name, other evaluated splits' as "<split>/<name>"."""
    pooling = config.pooling_for(model.objective)
    head = HeadConfig(num_labels=1 if data.regression else len(data.labels), pooling=pooling,
                      classifier_dropout=config.classifier_dropout)
    classifier = classifier_from_backbone(model, head, rngs=nnx.Rngs(seed))
    if start_from is not None:
        earlier, _ = load_classifier(start_from)
        nnx.update(classifier.backbone, nnx.state(earlier.backbone, nnx.Param))
        nnx.update(classifier.head, nnx.state(earlier.head, nnx.Param))
    rows = len(data.train["labels"])
    steps_per_epoch = math.ceil(rows / task.batch_size)
    padded_rows = round_up(task.batch_size, mesh.size)
    graph = nnx.graphdef(classifier)

    def batch(step: int) -> Batch:
        # Epoch e's order is a permutation drawn from (seed, e); step i of an epoch takes
        # rows [i * batch_size, (i + 1) * batch_size) of it (the last may be short:
        # drop_last False, as Ettin's jobs), padded with weight-0 rows for the devices.
        epoch, within = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        taken = order[within * task.batch_size:(within + 1) * task.batch_size]
        return pad_rows({k: v[taken] for k, v in data.train.items()}, padded_rows)

    predict = jax.jit(lambda params, inputs: nnx.merge(graph, params)(
        inputs["input_ids"], inputs["attention_mask"]))

    def evaluate(trained: EttinClassifier) -> dict[str, float]:
        return _evaluate(predict, nnx.to_pure_dict(nnx.state(trained)), data, task,
                         round_up(config.eval_batch_size, mesh.size), mesh)

    def export(trained: EttinClassifier, out: Path) -> None:
        _export(trained, tokenizer, data, out)

    settings = settings_of(task, config) | {
        "seed": seed, "pooling": pooling,
        "start_from": None if start_from is None else str(start_from)}
    return SeedRun(
        task=task.name, seed=seed, settings=settings, module=classifier,
        optimizer=optimizer_config(task), warmup_fraction=task.warmup_fraction,
        final_lr_fraction=task.final_lr_fraction, steps_per_epoch=steps_per_epoch,
        epochs=task.epochs, batch=batch,
        loss_and_grads=_loss_and_grads(graph, regression=data.regression),
        evaluate=evaluate, export=export,
        meta=checkpoint_meta(model.config, model.objective, tokenizer.special_tokens) | {
            "head": dataclasses.asdict(head), "task": task.name})


def start_from(run_dir: Path, task: TaskSpec, member: str, index: int) -> Path | None:
    """The fine-tuned classifier seed `index` of `task.init_from_task` starts from, when that
    task was fine-tuned in `run_dir` (else None, after telling the user)."""
    if task.init_from_task is None:
        return None
    earlier = seed_dir(run_dir, task.init_from_task, member, index)
    if (earlier / RESULTS_FILE).is_file() and (earlier / HF_DIR).is_dir():
        return earlier / HF_DIR
    tell_user(f"{task.name} {member} seed{index}: Ettin starts {task.name} from "
              f"{task.init_from_task}, which is not fine-tuned in {run_dir} (run `ettin-jax "
              f"finetune {run_dir} --task {task.init_from_task}` first); starting from the "
              f"pretrained {member}")
    return None


def _loss_and_grads(graph: nnx.GraphDef, *, regression: bool):
    """The weighted mean loss of a batch (cross-entropy, or squared error for regression, as
    transformers computes them), its gradient, and the batch accuracy (classification)."""

    def loss_fn(params, batch, rng):
        logits = nnx.merge(graph, params)(batch["input_ids"], batch["attention_mask"],
                                          deterministic=False, dropout_rng=rng)
        weights = batch["weights"]
        if regression:
            per_row = jnp.square(logits[:, 0] - batch["labels"].astype(jnp.float32))
            correct = jnp.zeros_like(per_row)
        else:
            per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
        count = jnp.maximum(weights.sum(), 1.0)
        return (per_row * weights).sum() / count, (correct * weights).sum() / count

    def loss_and_grads(params, batch, rng):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        return loss, grads, {} if regression else {"accuracy": accuracy}

    return loss_and_grads


def _evaluate(predict, params, data: TaskData, task: TaskSpec, rows: int,
              mesh) -> dict[str, float]:
    """The task's metrics (no dropout) on each evaluated split, `rows` per call."""
    results: dict[str, float] = {}
    for split, examples in data.evaluated.items():
        inputs = {k: v for k, v in examples.items() if k != "labels"}
        logits = map_rows(predict, params, inputs, rows, mesh).astype(np.float64)
        predictions = logits[:, 0] if data.regression else logits.argmax(-1)
        found = compute_metrics(task.metrics, predictions, examples["labels"])
        prefix = "" if split == task.dev_split else f"{split}/"
        results |= {prefix + name: value for name, value in found.items()}
    return results


def _export(classifier: EttinClassifier, tokenizer, data: TaskData, out: Path) -> None:
    """The fine-tuned classifier as transformers' class for its member in out/hf, with a
    tokenizer that adds the member's special tokens; a pooling transformers cannot express
    (the decoder's mean) is said and not exported."""
    if classifier.head_config.pooling not in EXPORTABLE_POOLINGS[classifier.objective]:
        tell_user(f"{out}: {classifier.head_config.pooling} pooling on the "
                  f"{out.parent.name} has no transformers class; not exported")
        return
    tokenizer.save(out / TOKENIZER, objective=classifier.objective)
    save_classifier(classifier, out / HF_DIR, special_tokens=tokenizer.special_tokens,
                    tokenizer_dir=out / TOKENIZER,
                    id2label=None if data.regression else dict(enumerate(data.labels)))


def settings_of(task: TaskSpec, config: FinetuneConfig) -> dict[str, Any]:
    """What a sweep records in its summary: the task's recipe and the run settings."""
    return {"task": task.name, **task_settings(task), **recipe_to_dict(config)}
