"""Train-step speed of ettin-jax against a PyTorch reference step (transformers'
ModernBertForMaskedLM + torch AdamW) on the same batch, sequence length and dtype.

    .venv/bin/python benchmarks/train_step.py [--presets tiny ettin-17m] [--batch 8] [--seq 512]

Both sides run the MLM objective at 30% masking on the same random packed-free rows, fp32, on
this machine's default JAX device and torch's CPU. Prints a Markdown table for
docs/benchmarks.md (median step time over --steps after warm-up; ratio = ours / theirs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from data_pipelines.objectives import mlm_inputs
from data_pipelines.special_tokens import PROJECT
from ettin_jax.config import recipe_from_preset
from ettin_jax.config.schema import MeshConfig
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import init_state
from ettin_jax.training.step import sharded_train_step
from provenance import print_provenance


def _batch(vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
    segments = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    masked = mlm_inputs(ids, segments, seed=0, step=0, rows=np.arange(batch), mask_ratio=0.3,
                        special=PROJECT, vocab_size=vocab)
    return {"segment_ids": segments, "positions": positions, **masked}


def _time(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(preset: str, batch: dict[str, np.ndarray], steps: int) -> float:
    recipe = recipe_from_preset(preset)
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    optimizer = make_optimizer(recipe.optimizer)
    state, shardings = init_state(recipe.model, "mlm", optimizer, mesh, seed=0)
    fn = sharded_train_step(recipe.model, "mlm", optimizer, shardings, mesh, seed=0,
                            mlm_mask_ratio=0.3)
    placed = jax.device_put(batch, batch_sharding(mesh))
    holder = [state]

    def step():
        holder[0], metrics = fn(holder[0], placed, 1e-4)
        jax.block_until_ready(metrics["loss"])

    return _time(step, steps)


def theirs(preset: str, batch: dict[str, np.ndarray], steps: int) -> float:
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = recipe_from_preset(preset).model
    hf = ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, local_attention=config.local_attention,
        attention_dropout=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
        sep_token_id=3)
    hf._attn_implementation = "sdpa"
    model = ModernBertForMaskedLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    mask = torch.ones_like(ids)

    def step():
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    return _time(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ettin-17m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print_provenance(f"batch {args.batch} x seq {args.seq}, fp32, MLM 30%")
    print("| preset | ettin-jax step | tokens/s | PyTorch (transformers) step | tokens/s | "
          "ratio ours/theirs (tokens/s) |")
    print("|---|---|---|---|---|---|")
    tokens = args.batch * args.seq
    for preset in args.presets:
        batch = _batch(recipe_from_preset(preset).model.vocab_size, args.batch, args.seq)
        a, b = ours(preset, batch, args.steps), theirs(preset, batch, args.steps)
        print(f"| {preset} | {a * 1e3:.0f} ms | {tokens / a:,.0f} | {b * 1e3:.0f} ms | "
              f"{tokens / b:,.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
