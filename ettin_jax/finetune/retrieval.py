"""Retrieval runs: a member as a bi-encoder (`models.embedding`: the pooled final hidden
states), trained on (query, positive, hard negatives) triplets with sentence-transformers'
MultipleNegativesRankingLoss computed GradCache-style (`finetune.contrastive`: memory follows
the task's mini_batch_size, the gradient is the whole batch's), by the shared loop
(`finetune.loop`); scored by ranking the evaluation corpus for every query
(`finetune.retrieval_metrics`: nDCG@10, MRR@10, recall@k as trec_eval computes them) at every
epoch's end; exported as a sentence-transformers folder (`hf.sentence_transformers`).

Batches are drawn as sentence-transformers' NoDuplicatesBatchSampler draws them (when the
task's no_duplicates is on): in an epoch's permuted order (seed, epoch), an example joins the
batch being filled only when none of its texts is already in it (in-batch negatives are then
never copies of a positive); a batch that cannot be filled so takes the next examples as they
come. Every batch is full: an epoch is floor(examples / batch_size) steps (the shapes stay
static). Dropout is off, as in Ettin's sentence-transformers runs (its exports carry
`attention_dropout: 0.0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from data_pipelines.retrieval_data import RetrievalEvalSet, RetrievalExample, read_retrieval_task
from data_pipelines.task_data import encode_texts
from ettin_jax.config.loading import recipe_to_dict
from ettin_jax.config.schema import OptimizerConfig
from ettin_jax.errors import ConfigError
from ettin_jax.finetune.config import FinetuneConfig
from ettin_jax.finetune.contrastive import contrastive_grads
from ettin_jax.finetune.loop import Batch, SeedRun, map_rows, round_up
from ettin_jax.finetune.retrieval_metrics import parse_metric, rank_corpus, retrieval_metrics
from ettin_jax.finetune.retrieval_tasks import RetrievalTaskSpec
from ettin_jax.hf.sentence_transformers import save_sentence_transformer
from ettin_jax.models.embedding import check_embedding_pooling, embed, without_lm_head
from ettin_jax.models.transformer import EttinModel
from ettin_jax.hf.transfer import HF_DIR
from ettin_jax.training.checkpoint import TOKENIZER, checkpoint_meta
from ettin_jax.training.distributed import tell_user



@dataclasses.dataclass(frozen=True)
class RetrievalData:
    """A retrieval task encoded for one member: the training queries [n, max_query_length]
    and documents [n, documents, max_document_length] (the positive first, then the same
    number of hard negatives for every example), each example's texts (for no-duplicates
    batching), and the evaluation set."""

    queries: Batch
    documents: Batch
    texts: tuple[frozenset[str], ...]
    eval_set: RetrievalEvalSet

    @property
    def examples(self) -> int:
        """Training examples."""
        return len(self.texts)


def encode_retrieval(task: RetrievalTaskSpec, tokenizer, *, objective: str) -> RetrievalData:
    """`task`'s training triplets and evaluation set, the triplets encoded for a member of
    `objective` (special tokens as the member sees text, truncated to the task's max lengths).
    Examples keep as many hard negatives as the one with fewest has (said when some are
    dropped). Raises TaskDataError as reading the task does."""
    examples, eval_set = read_retrieval_task(task)
    negatives = min(len(example.negatives) for example in examples)
    if any(len(example.negatives) > negatives for example in examples):
        tell_user(f"{task.name}: every batch row needs as many documents; keeping the first "
                  f"{negatives} hard negative(s) of each example")
    queries = encode_texts([e.query for e in examples], tokenizer, objective=objective,
                           max_length=task.max_query_length)
    documents = encode_texts([text for e in examples for text in _documents(e, negatives)],
                             tokenizer, objective=objective,
                             max_length=task.max_document_length)
    documents = {k: v.reshape(len(examples), negatives + 1, -1) for k, v in documents.items()}
    texts = tuple(frozenset((e.query, *_documents(e, negatives))) for e in examples)
    return RetrievalData(queries, documents, texts, eval_set)


def retrieval_run(model: EttinModel, tokenizer, task: RetrievalTaskSpec, data: RetrievalData,
                  config: FinetuneConfig, *, seed: int, mesh) -> SeedRun:
    """The run of `model` (its vocabulary head dropped) as a bi-encoder on `data`, as the
    loop takes it. Pooling: config.pooling, else the task's for the member. Raises
    ConfigError for a pooling the member does not have, or a batch that does not split over
    the devices or that the examples cannot fill."""
    pooling = config.pooling or (task.encoder_pooling if model.objective == "mlm"
                                 else task.decoder_pooling)
    try:
        check_embedding_pooling(model.objective, pooling)
    except ValueError as err:
        raise ConfigError(f"pooling={pooling}: {err}") from None
    if task.batch_size % mesh.size:
        raise ConfigError(f"{task.name}: batch_size={task.batch_size} must split over the "
                          f"{mesh.size} devices")
    steps_per_epoch = data.examples // task.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{task.name}: batch_size={task.batch_size} is more than the "
                          f"{data.examples} training examples")
    if task.similarity != "cosine":
        raise ConfigError(f"{task.name}: similarity={task.similarity!r}: the contrastive "
                          f"loss is sentence-transformers' cosine one; use cosine")
    encoder = without_lm_head(model)
    graph = nnx.graphdef(encoder)
    epochs: dict[int, list[np.ndarray]] = {}

    def batch(step: int) -> Batch:
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = epoch_batches(data.texts, task.batch_size, steps_per_epoch,
                                          seed=seed, epoch=epoch,
                                          no_duplicates=task.no_duplicates)
        rows = epochs[epoch][within]
        return {"query_input_ids": data.queries["input_ids"][rows],
                "query_attention_mask": data.queries["attention_mask"][rows],
                "document_input_ids": data.documents["input_ids"][rows],
                "document_attention_mask": data.documents["attention_mask"][rows]}

    def loss_and_grads(params, inputs, rng):
        del rng  # dropout off (module docstring)
        loss, grads = contrastive_grads(params, graph, inputs,
                                        mini_batch_size=task.mini_batch_size,
                                        scale=task.scale, pooling=pooling)
        return loss, grads, {}

    embed_rows = jax.jit(lambda params, inputs: embed(
        nnx.merge(graph, params), inputs["input_ids"], inputs["attention_mask"], pooling))
    rows_per_call = round_up(config.eval_batch_size, mesh.size)

    def evaluate(trained: nnx.Module) -> dict[str, float]:
        params = nnx.to_pure_dict(nnx.state(trained))
        queries = data.eval_set.evaluated_queries()
        corpus = data.eval_set.corpus

        def embedded(texts: Sequence[str], max_length: int) -> np.ndarray:
            encoded = encode_texts(texts, tokenizer, objective=model.objective,
                                   max_length=max_length)
            return map_rows(embed_rows, params, encoded, rows_per_call, mesh)

        top_k = max(parse_metric(name)[1] for name in task.metrics)
        run = rank_corpus(embedded(list(queries.values()), task.max_query_length),
                          embedded(list(corpus.values()), task.max_document_length),
                          min(top_k, len(corpus)), query_ids=list(queries),
                          corpus_ids=list(corpus), similarity=task.similarity)
        found = retrieval_metrics(run, data.eval_set.qrels,
                                  k_values=sorted({parse_metric(n)[1] for n in task.metrics}))
        return {name: found[name] for name in task.metrics}

    def export(trained: nnx.Module, out: Path) -> None:
        tokenizer.save(out / TOKENIZER, objective=model.objective)
        save_sentence_transformer(trained, out / HF_DIR, pooling=pooling, normalize=False,
                                  tokenizer_dir=out / TOKENIZER,
                                  max_seq_length=task.max_document_length,
                                  special_tokens=tokenizer.special_tokens)

    settings = settings_of(task, config) | {"seed": seed, "pooling": pooling}
    optimizer = OptimizerConfig(name="adamw", learning_rate=task.learning_rate,
                                b1=task.adam_b1, b2=task.adam_b2, eps=task.adam_eps,
                                weight_decay=task.weight_decay,
                                clip_grad_norm=task.max_grad_norm)
    return SeedRun(
        task=task.name, seed=seed, settings=settings, module=encoder, optimizer=optimizer,
        warmup_fraction=task.warmup_fraction, final_lr_fraction=task.final_lr_fraction,
        steps_per_epoch=steps_per_epoch, epochs=task.epochs, batch=batch,
        loss_and_grads=loss_and_grads, evaluate=evaluate, export=export,
        meta=checkpoint_meta(model.config, model.objective, tokenizer.special_tokens) | {
            "embedding_pooling": pooling, "task": task.name})


def epoch_batches(texts: Sequence[frozenset[str]], batch_size: int, count: int, *, seed: int,
                  epoch: int, no_duplicates: bool) -> list[np.ndarray]:
    """The first `count` full batches (example indices) of an epoch: the examples in the
    permuted order of (seed, epoch), each batch filled as the module docstring says."""
    remaining = list(np.random.default_rng([seed, epoch]).permutation(len(texts)))
    batches = []
    while len(batches) < count:
        taken: list[int] = []
        seen: set[str] = set()
        skipped: list[int] = []
        position = 0
        while len(taken) < batch_size and position < len(remaining):
            index = remaining[position]
            position += 1
            if no_duplicates and not texts[index].isdisjoint(seen):
                skipped.append(index)
                continue
            taken.append(index)
            seen |= texts[index]
        rest = skipped + remaining[position:]
        fill = batch_size - len(taken)  # duplicates unavoidable: the next ones as they come
        taken += rest[:fill]
        remaining = rest[fill:]
        batches.append(np.asarray(taken))
    return batches


def settings_of(task: RetrievalTaskSpec, config: FinetuneConfig) -> dict[str, Any]:
    """What a retrieval run records: the task's recipe (its seeds aside) and the run
    settings."""
    recipe = recipe_to_dict(task)
    recipe.pop("seeds", None)
    return {"task": task.name, **recipe, **recipe_to_dict(config)}


def _documents(example: RetrievalExample, negatives: int) -> tuple[str, ...]:
    return (example.positive, *example.negatives[:negatives])
