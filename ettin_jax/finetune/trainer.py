"""Fine-tune a member of the pair on a classification or regression task, over a seed sweep.

    summary = finetune(RUN_DIR, task, config, member="encoder", seeds=5)

Each seed is one run in RUN_DIR/finetune/<task>/<member>/seed<k> (`finetune.results`) on the
training machinery: the mesh and sharding rules, a jitted step with explicit shardings and a
donated state, orbax checkpoints (`TrainCheckpointer`; the same layout as a training run),
metrics.jsonl, TensorBoard and a progress bar (`MetricsLog`). The data order of an epoch is a
function of (seed, epoch), so a run killed at any moment resumes from its last checkpoint to the
losses an uninterrupted run gives; a seed whose results.json exists is done and not rerun.
The dev set is evaluated at every epoch's end; the last evaluation is the seed's result, and the
fine-tuned classifier is exported to seed<k>/hf as transformers' class for the member.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines.task_data import encode_examples, read_examples
from ettin_jax.config.loading import recipe_to_dict
from ettin_jax.config.schema import MEMBERS, CheckpointConfig
from ettin_jax.errors import CheckpointError, ConfigError
from ettin_jax.finetune.config import FinetuneConfig, optimizer_config, sweep_seeds, task_settings
from ettin_jax.finetune.metrics import compute_metrics, summarize_seeds
from ettin_jax.finetune.results import (
    RESULTS_FILE,
    TaskSummary,
    seed_dir,
    write_json,
    write_summary,
)
from ettin_jax.finetune.tasks import TaskSpec
from ettin_jax.hf.classification import load_classifier, save_classifier
from ettin_jax.hf.config import from_hf_config
from ettin_jax.hf.pretrained import CONFIG_FILE
from ettin_jax.inference import load_model
from ettin_jax.models.classification import (
    EXPORTABLE_POOLINGS,
    EttinClassifier,
    HeadConfig,
    check_pooling,
    classifier_from_backbone,
)
from ettin_jax.models.transformer import EttinModel
from ettin_jax.training.checkpoint import (
    TrainCheckpointer,
    checkpoint_meta,
    find_members,
    read_objective,
)
from ettin_jax.training.distributed import tell_user
from ettin_jax.training.mesh import batch_sharding, make_mesh, replicated
from ettin_jax.training.metrics import MetricsLog
from ettin_jax.training.optimizer import make_optimizer, set_learning_rate
from ettin_jax.training.schedules import token_count
from ettin_jax.training.state import TrainState, module_shardings, state_shardings

Batch = dict[str, np.ndarray]
TOKENIZER_DIR = "tokenizer"
HF_DIR = "hf"
RUNTIME_SETTINGS = ("eval_batch_size", "logging_every_steps", "checkpoint_every_steps", "mesh")


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


def finetune(source: str | Path, task: TaskSpec, config: FinetuneConfig, *, member: str,
             run_dir: str | Path | None = None, seeds: int = 1) -> TaskSummary:
    """Fine-tunes `member` ("encoder" or "decoder") of `source` (a run directory, a member or
    checkpoint directory, or a HuggingFace directory: `inference.load_model`) on `task` with
    the task's recipe, once per seed of `sweep_seeds(task, seeds)`, into
    RUN_DIR/finetune/<task>/<member>/seed<k> (RUN_DIR: `run_dir`, default `source`), and
    writes the sweep's summary.json. Seeds already done are read, not rerun; a seed
    interrupted earlier resumes from its last checkpoint. A task with `init_from_task` (Ettin
    starts RTE, MRPC and STS-B from MNLI) starts seed k from that task's fine-tuned seed k of
    the same member when it is there, else from the pretrained member (and says so).
    Returns the summary. Raises what reading the model or the task data raises
    (CheckpointError, TaskDataError), ConfigError for a pooling the member does not have, and
    CheckpointError for a seed started with other settings."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    run_dir = Path(source if run_dir is None else run_dir)
    model, tokenizer = load_model(source, member)
    try:
        check_pooling(model.objective, config.pooling_for(model.objective))
    except ValueError as err:
        raise ConfigError(f"pooling={config.pooling}: {err}") from None
    data = encode_task(task, tokenizer, objective=model.objective)
    mesh = make_mesh(config.mesh)
    results = []
    for index, seed in enumerate(sweep_seeds(task, seeds)):
        start = _start_from(run_dir, task, member, index)
        results.append(finetune_seed(model, tokenizer, task, data, config, seed=seed,
                                     mesh=mesh, out=seed_dir(run_dir, task.name, member, index),
                                     start_from=start))
    per_seed = tuple(result["metrics"] for result in results)
    summary = TaskSummary(task=task.name, member=member, headline=task.metrics[0],
                          seeds=per_seed, summary=summarize_seeds(list(per_seed)),
                          settings=_settings(task, config) | {"source": str(source)})
    write_summary(run_dir, summary)
    return summary


def encode_task(task: TaskSpec, tokenizer, *, objective: str) -> TaskData:
    """`task`'s train split and evaluated splits read and encoded for a member of `objective`
    at the task's max_length."""
    def encoded(split: str) -> Batch:
        return encode_examples(read_examples(task, split), tokenizer, objective=objective,
                               max_length=task.max_length)

    evaluated = {split: encoded(split) for split in (task.dev_split, *task.extra_dev_splits)}
    return TaskData(train=encoded(task.train_split), evaluated=evaluated, labels=task.labels)


def finetune_seed(model: EttinModel, tokenizer, task: TaskSpec, data: TaskData,
                  config: FinetuneConfig, *, seed: int, mesh, out: Path,
                  start_from: Path | None = None) -> dict[str, Any]:
    """One run of a sweep with `seed` (head init, data order, dropout) into `out`; returns
    its results (what results.json holds: task, member, seed, steps, and the final `metrics`:
    the dev split's by name, other evaluated splits' as "<split>/<name>"). `start_from`: a
    fine-tuned classifier directory whose backbone and head (not its classifier) the run
    starts from."""
    settings = _settings(task, config) | {"seed": seed, "pooling": config.pooling_for(
        model.objective), "start_from": None if start_from is None else str(start_from)}
    results_path = out / RESULTS_FILE
    if results_path.is_file():
        done = json.loads(results_path.read_text())
        _check_same_settings(out, done["settings"], settings)
        return done
    head = HeadConfig(num_labels=1 if data.regression else len(data.labels),
                      pooling=settings["pooling"], classifier_dropout=config.classifier_dropout)
    classifier = classifier_from_backbone(model, head, rngs=nnx.Rngs(seed))
    if start_from is not None:
        earlier, _ = load_classifier(start_from)
        nnx.update(classifier.backbone, nnx.state(earlier.backbone, nnx.Param))
        nnx.update(classifier.head, nnx.state(earlier.head, nnx.Param))
    graph, params = _split(classifier)
    optimizer = make_optimizer(optimizer_config(task))
    shardings = state_shardings(optimizer, module_shardings(classifier, mesh), params, mesh)
    plan = _Plan(rows=len(data.train["labels"]), epochs=task.epochs,
                 batch_size=task.batch_size, devices=mesh.size)
    step_fn = jax.jit(_make_step(graph, optimizer, _learning_rate(task, plan.total_steps),
                                 seed=seed, regression=data.regression),
                      in_shardings=(shardings, batch_sharding(mesh)),
                      out_shardings=(shardings, None), donate_argnums=0)
    predict = _make_predict(graph, shardings.params, mesh)
    meta = checkpoint_meta(model.config, model.objective, tokenizer.special_tokens) | {
        "head": dataclasses.asdict(head), "task": task.name}
    every = config.checkpoint_every_steps or plan.steps_per_epoch
    out.mkdir(parents=True, exist_ok=True)
    with TrainCheckpointer(out, CheckpointConfig(every_steps=every, keep=2)) as checkpoints:
        state = _start(checkpoints, params, optimizer, shardings, settings)
        step = int(state.step)
        log = MetricsLog(out, resume_step=step, desc=f"{task.name} {out.parent.name} "
                         f"{out.name}", progress=(plan.total_steps, step))
        metrics = None
        try:
            while step < plan.total_steps:
                batch = _place(plan.batch(data.train, step, seed), mesh)
                state, step_metrics = step_fn(state, batch)
                step += 1
                epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
                if step % config.logging_every_steps == 0 or epoch_end:
                    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    log.log({"step": step, "epoch": step / plan.steps_per_epoch, **record})
                log.advance()
                if epoch_end:
                    metrics = evaluate(predict, state.params, data, task, config, mesh)
                    log.log({"step": step, "epoch": step / plan.steps_per_epoch,
                             **{f"eval_{k}": v for k, v in metrics.items()}})
                if step % every == 0 or step == plan.total_steps:
                    checkpoints.save(step, state, meta=meta, recipe=settings,
                                     progress={"tokens": 0, "step": step})
        finally:
            log.close()
        if metrics is None:  # resumed after the last step: evaluate what was saved
            metrics = evaluate(predict, state.params, data, task, config, mesh)
    _export(nnx.merge(graph, jax.device_get(state.params)), tokenizer, data, out)
    result = {"task": task.name, "member": out.parent.name, "seed": seed,
              "steps": plan.total_steps, "epochs": task.epochs,
              "start_from": settings["start_from"], "metrics": metrics, "settings": settings}
    write_json(results_path, result)
    return result


def evaluate(predict: Callable, params, data: TaskData, task: TaskSpec, config: FinetuneConfig,
             mesh) -> dict[str, float]:
    """The task's metrics of `params` (no dropout) on each evaluated split: the dev split's
    by metric name, the others' as "<split>/<metric>"."""
    results: dict[str, float] = {}
    size = _round_up(config.eval_batch_size, mesh.size)
    for split, rows in data.evaluated.items():
        outputs = []
        for start in range(0, len(rows["labels"]), size):
            chunk = {k: v[start:start + size] for k, v in rows.items() if k != "labels"}
            logits = predict(params, _place(_pad_rows(chunk, size), mesh))
            outputs.append(np.asarray(jax.device_get(logits))[:len(chunk["input_ids"])])
        logits = np.concatenate(outputs).astype(np.float64)
        predictions = logits[:, 0] if data.regression else logits.argmax(-1)
        found = compute_metrics(task.metrics, predictions, rows["labels"])
        prefix = "" if split == task.dev_split else f"{split}/"
        results |= {prefix + name: value for name, value in found.items()}
    return results


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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which training rows each step takes: epoch e's order is a permutation drawn from
    (seed, e); step i of an epoch takes rows [i * batch_size, (i + 1) * batch_size) of it (the
    last batch of an epoch may be short: drop_last False, as Ettin's jobs); batches are padded
    with weight-0 rows to a multiple of the device count."""

    rows: int
    epochs: int
    batch_size: int
    devices: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def batch(self, train: Batch, step: int, seed: int) -> Batch:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(self.rows)
        taken = order[within * self.batch_size:(within + 1) * self.batch_size]
        return _pad_rows({k: v[taken] for k, v in train.items()},
                         _round_up(self.batch_size, self.devices))


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` padded to `rows` rows of zeros (attention_mask 0), with "weights" (1 on the
    real rows, 0 on the padding)."""
    real = len(batch["input_ids"])
    padded = {k: np.concatenate([v, np.zeros((rows - real, *v.shape[1:]), v.dtype)])
              for k, v in batch.items()}
    padded["weights"] = (np.arange(rows) < real).astype(np.float32)
    return padded


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _place(batch: Batch, mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch (every process holds the whole batch), as global
    arrays split over the mesh's rows."""
    sharding = batch_sharding(mesh)
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(
        sharding, np.array_split(v, count)[index], v.shape) for k, v in batch.items()}


def _split(classifier: EttinClassifier) -> tuple[nnx.GraphDef, dict]:
    graph, state = nnx.split(classifier)
    return graph, nnx.to_pure_dict(state)


def _learning_rate(task: TaskSpec, total_steps: int) -> optax.Schedule:
    """Linear warmup over the task's warmup_fraction of the steps, then linear decay to
    final_lr_fraction x peak at the last step (Composer's LinearWithWarmupScheduler, as
    Ettin's GLUE jobs use it)."""
    warmup = round(task.warmup_fraction * total_steps)
    peak = task.learning_rate
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak, max(warmup, 1)),
        optax.linear_schedule(peak, peak * task.final_lr_fraction,
                              max(total_steps - warmup, 1)),
    ], [warmup])


def _make_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, *, seed: int, regression: bool) -> Callable:
    """step(state, batch) -> (state, metrics): one AdamW update on the weighted mean loss
    (cross-entropy, or squared error for regression, as transformers computes them); an
    update whose loss or gradient is not finite is skipped and counted."""

    def loss_fn(params, batch, rng):
        classifier = nnx.merge(graph, params)
        logits = classifier(batch["input_ids"], batch["attention_mask"], deterministic=False,
                            dropout_rng=rng)
        weights = batch["weights"]
        if regression:
            per_row = jnp.square(logits[:, 0] - batch["labels"].astype(jnp.float32))
            correct = jnp.zeros_like(per_row)
        else:
            per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
        count = jnp.maximum(weights.sum(), 1.0)
        return (per_row * weights).sum() / count, (correct * weights).sum() / count

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng)
        learning_rate = schedule(state.step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        opt_state = set_learning_rate(state.opt_state, learning_rate)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o),  # noqa: E731
                                             new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics = {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                   "skipped": new_state.skipped}
        if not regression:
            metrics["accuracy"] = accuracy
        return new_state, metrics

    return step


def _make_predict(graph: nnx.GraphDef, params_shardings, mesh) -> Callable:
    """predict(params, batch) -> logits [rows, labels] float32, without dropout."""

    def predict(params, batch):
        return nnx.merge(graph, params)(batch["input_ids"], batch["attention_mask"])

    return jax.jit(predict, in_shardings=(params_shardings, batch_sharding(mesh)),
                   out_shardings=replicated(mesh))


def _start(checkpoints: TrainCheckpointer, params, optimizer, shardings: TrainState,
           settings: Mapping[str, Any]) -> TrainState:
    """The state to go on from: the latest checkpoint (refused, naming the differing settings,
    when it was written with other settings; how the run executes may change), else step 0
    with `params`."""
    def fresh(params):
        zero = jnp.zeros([], jnp.int32)
        return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                          skipped=zero, nonfinite_streak=zero,
                          phase_tokens=jnp.asarray(token_count(0)))

    latest = checkpoints.latest_step()
    if latest is None:
        return jax.jit(fresh, out_shardings=shardings)(jax.device_put(params, shardings.params))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(fresh, params), shardings)
    state, _, saved = checkpoints.restore(latest, abstract)
    _check_same_settings(checkpoints.member_dir, saved, settings)
    return state


def _check_same_settings(where: Path, saved: Mapping[str, Any],
                         settings: Mapping[str, Any]) -> None:
    """Raises CheckpointError naming every setting (other than how the run executes) in which
    the run in `where` differs from `settings`."""
    differ = sorted(k for k in set(saved) | set(settings)
                    if k not in RUNTIME_SETTINGS and saved.get(k) != settings.get(k))
    if differ:
        raise CheckpointError(f"{where} was fine-tuned with other settings ("
                              + ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}"
                                          for k in differ)
                              + f"); delete {where} to start it again with these")


def _start_from(run_dir: Path, task: TaskSpec, member: str, index: int) -> Path | None:
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


def _export(classifier: EttinClassifier, tokenizer, data: TaskData, out: Path) -> None:
    """The fine-tuned classifier as transformers' class for its member in out/hf, with a
    tokenizer that adds the member's special tokens; a pooling transformers cannot express
    (the decoder's mean) is said and not exported."""
    if classifier.head_config.pooling not in EXPORTABLE_POOLINGS[classifier.objective]:
        tell_user(f"{out}: {classifier.head_config.pooling} pooling on the "
                  f"{out.parent.name} has no transformers class; not exported")
        return
    tokenizer.save(out / TOKENIZER_DIR, objective=classifier.objective)
    save_classifier(classifier, out / HF_DIR, special_tokens=tokenizer.special_tokens,
                    tokenizer_dir=out / TOKENIZER_DIR,
                    id2label=None if data.regression else dict(enumerate(data.labels)))


def _settings(task: TaskSpec, config: FinetuneConfig) -> dict[str, Any]:
    """What a run records and resumes with: the task's recipe and the run settings."""
    return {"task": task.name, **task_settings(task), **recipe_to_dict(config)}
