"""Memory of the retrieval gradient: GradCache mini-batches against the whole batch at once.

Compiles the gradient of sentence-transformers' MultipleNegativesRankingLoss for one batch of
(query, positive, hard negative) rows, once as `jax.grad` of the unchunked loss
(`finetune.contrastive.contrastive_loss`) and once per mini-batch size as
`finetune.contrastive.contrastive_grads`, and prints the compiled programs' temporary memory
(XLA's memory analysis; nothing is run) and compile time, side by side.

    .venv/bin/python benchmarks/contrastive_memory.py                       # tiny, CPU
    .venv/bin/python benchmarks/contrastive_memory.py --preset ettin-17m --rows 256 --seq 256
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ettin_jax.finetune.contrastive import contrastive_grads, contrastive_loss  # noqa: E402
from ettin_jax.models import EttinModel, get_preset  # noqa: E402
from ettin_jax.models.embedding import without_lm_head  # noqa: E402
from provenance import print_provenance  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=256, help="queries per batch")
    parser.add_argument("--documents", type=int, default=2, help="positive + hard negatives")
    parser.add_argument("--seq", type=int, default=128, help="tokens per query and document")
    parser.add_argument("--mini-batches", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args()
    config = dataclasses.replace(get_preset(args.preset), attention_impl="xla")
    print_provenance(f"{args.preset}, {args.rows} queries x {args.documents} documents, "
                     f"seq {args.seq}, encoder (mean pooling), fp32")
    model = nnx.eval_shape(lambda: without_lm_head(EttinModel(config, "mlm",
                                                              rngs=nnx.Rngs(0))))
    graph, state = nnx.split(model)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(state))
    ids = jax.ShapeDtypeStruct((args.rows, args.seq), jnp.int32)
    documents = jax.ShapeDtypeStruct((args.rows, args.documents, args.seq), jnp.int32)
    batch = {"query_input_ids": ids, "query_attention_mask": ids,
             "document_input_ids": documents, "document_attention_mask": documents}
    print("| gradient | rows embedded at once | temporaries MiB | compile s |")
    print("|---|---|---|---|")
    whole = jax.grad(lambda p, b: contrastive_loss(p, graph, b, pooling="mean"))
    rows = args.rows * (1 + args.documents)
    _report("whole batch (jax.grad of the loss)", rows, whole, params, batch)
    for size in args.mini_batches:
        chunked = (lambda s: lambda p, b: contrastive_grads(p, graph, b, mini_batch_size=s,
                                                            pooling="mean"))(size)
        _report(f"GradCache, mini-batch {size}", size, chunked, params, batch)


def _report(name: str, rows: int, function, params, batch) -> None:
    start = time.perf_counter()
    compiled = jax.jit(function).lower(params, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis().temp_size_in_bytes / MIB
    print(f"| {name} | {rows} | {memory:,.0f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
