"""Train-step speed of ettin-jax against a PyTorch reference step (transformers'
ModernBertForMaskedLM + torch AdamW) on the same batch, sequence length and dtype.

    .venv/bin/python benchmarks/train_step.py [--presets tiny ettin-17m] [--batch 8] [--seq 512]

Both sides run the MLM objective at 30% masking on the same random packed-free rows, fp32, on
this machine's default JAX device and torch's CPU. transformers runs twice: with its default
dense MLM head (every position) and with its sparse one (`ModernBertConfig(
sparse_prediction=True)`: the head only on positions whose label is not -100, the masked ones,
as ours). Prints a Markdown table for docs/benchmarks.md (median step time over --steps after
warm-up; ratio = ours / theirs in tokens/s).

The helpers here (`random_batch`, `jitted_step`, `build_step`, `call_step`, `median_seconds`)
also serve benchmarks/accelerator.py and benchmarks/loop_overhead.py.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from data_pipelines.objectives import clm_labels, mlm_inputs
from data_pipelines.special_tokens import PROJECT
from ettin_jax.config import recipe_from_preset
from ettin_jax.config.schema import MeshConfig, OptimizerConfig
from ettin_jax.models import ModelConfig
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import init_state
from ettin_jax.training.step import sharded_train_step
from provenance import print_provenance

LEARNING_RATE = 1e-4


def random_batch(vocab: int, batch: int, seq: int, *, objective: str = "mlm",
                 mask_ratio: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    """A [batch, seq] int32 batch of the contract's four arrays: random ids in [5, vocab), one
    document per row (no padding); MLM: exactly round(mask_ratio x seq) masked positions per
    row (`mlm_inputs`, "exact"); CLM: next-token labels (`clm_labels`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
    segments = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    if objective == "clm":
        return {"input_ids": ids, "segment_ids": segments, "positions": positions,
                "labels": clm_labels(ids, segments)}
    masked = mlm_inputs(ids, segments, seed=seed, step=0, rows=np.arange(batch),
                        mask_ratio=mask_ratio, special=PROJECT, vocab_size=vocab)
    return {"segment_ids": segments, "positions": positions, **masked}


def takes_learning_rate(step_fn: Callable) -> bool:
    """Whether the jitted step is step_fn(state, batch, learning_rate) (the learning rate
    from the host) rather than step_fn(state, batch) (computed inside the step)."""
    return len(inspect.signature(step_fn).parameters) >= 3


def call_step(step_fn: Callable, state, batch, learning_rate: float = LEARNING_RATE):
    """step_fn(state, batch[, learning_rate]) -> (state, metrics), whichever the step takes."""
    if takes_learning_rate(step_fn):
        return step_fn(state, batch, learning_rate)
    return step_fn(state, batch)


def jitted_step(config: ModelConfig, objective: str, *, mlm_mask_ratio: float | None = 0.3,
                optimizer: OptimizerConfig | None = None, mesh=None, seed: int = 0):
    """(step_fn, state, mesh): the project's jitted `sharded_train_step` of `objective` for
    `config` with `optimizer` (default: the recipe default, StableAdamW) and a fresh state
    from `init_state`, on `mesh` (default: a 1 x 1 mesh of the first device)."""
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1]) if mesh is None else mesh
    optimizer = make_optimizer(optimizer or OptimizerConfig())
    state, shardings = init_state(config, objective, optimizer, mesh, seed=seed)
    fn = build_step(config, objective, optimizer, shardings, mesh, seed=seed,
                    mlm_mask_ratio=mlm_mask_ratio)
    return fn, state, mesh


def build_step(config: ModelConfig, objective: str, optimizer, shardings, mesh, *, seed: int,
               mlm_mask_ratio: float | None, microbatch_size: int | None = None) -> Callable:
    """`sharded_train_step` at a constant learning rate (LEARNING_RATE): passed to it when it
    takes the schedule (the step computes its learning rate), else by `call_step`."""
    kwargs = dict(seed=seed, microbatch_size=microbatch_size, mlm_mask_ratio=mlm_mask_ratio)
    if "learning_rate" in inspect.signature(sharded_train_step).parameters:
        kwargs["learning_rate"] = LEARNING_RATE
    return sharded_train_step(config, objective, optimizer, shardings, mesh, **kwargs)


def median_seconds(step: Callable[[], None], steps: int, *, warmup: int = 2,
                   limit_s: float | None = None) -> tuple[float, int]:
    """(median wall seconds of step(), timed calls) over `steps` calls after `warmup` untimed
    ones; with `limit_s`, timing stops early (after at least one call) once the timed calls
    have taken that long. step() must block until its work is done."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if limit_s is not None and sum(times) >= limit_s:
            break
    return statistics.median(times), len(times)


def ours(preset: str, batch: dict[str, np.ndarray], steps: int) -> float:
    """Median seconds of our jitted MLM step (fp32, head on masked positions only)."""
    fn, state, mesh = jitted_step(recipe_from_preset(preset).model, "mlm", mlm_mask_ratio=0.3)
    placed = jax.device_put(batch, batch_sharding(mesh))
    holder = [state]

    def step():
        holder[0], metrics = call_step(fn, holder[0], placed)
        jax.block_until_ready(metrics["loss"])

    return median_seconds(step, steps)[0]


def theirs(preset: str, batch: dict[str, np.ndarray], steps: int, *,
           sparse_prediction: bool = False) -> float:
    """Median seconds of transformers' ModernBertForMaskedLM + torch AdamW on the same batch;
    `sparse_prediction`: its head and loss only where labels != -100 (the masked positions)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = recipe_from_preset(preset).model
    hf = ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, local_attention=config.local_attention,
        attention_dropout=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
        sep_token_id=3, sparse_prediction=sparse_prediction, sparse_pred_ignore_index=-100)
    hf._attn_implementation = "sdpa"
    model = ModernBertForMaskedLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    mask = torch.ones_like(ids)

    def step():
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    return median_seconds(step, steps)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ettin-17m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print_provenance(f"batch {args.batch} x seq {args.seq}, fp32, MLM 30%")
    print("| preset | ettin-jax step | tokens/s | transformers, dense head: step | tokens/s | "
          "ours / dense | transformers, sparse head: step | tokens/s | ours / sparse |")
    print("|---|---|---|---|---|---|---|---|---|")
    tokens = args.batch * args.seq
    for preset in args.presets:
        batch = random_batch(recipe_from_preset(preset).model.vocab_size, args.batch, args.seq)
        a = ours(preset, batch, args.steps)
        dense = theirs(preset, batch, args.steps)
        sparse = theirs(preset, batch, args.steps, sparse_prediction=True)
        print(f"| {preset} | {a * 1e3:.0f} ms | {tokens / a:,.0f} | {dense * 1e3:.0f} ms | "
              f"{tokens / dense:,.0f} | {dense / a:.2f}x | {sparse * 1e3:.0f} ms | "
              f"{tokens / sparse:,.0f} | {sparse / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
