"""The training losses, as sums: causal LM (every position with a target) and masked LM (the
head on the masked positions only, Ettin's sparse prediction). One home for both, used by the
train step and by held-out evaluation.

Losses are cross-entropy in fp32 whatever the compute dtype, returned as sums with their target
count so that microbatches and devices add up to the full batch's mean exactly.

The vocabulary projection never runs on all positions at once: `chunked_head_sums` runs the
head and the cross-entropy on chunks of at most LOGITS_CHUNK_ELEMENTS // vocab positions in a
`lax.scan` whose body is rematerialised, so only one chunk's [positions, vocab] logits exist,
forward and backward (a [rows, seq, vocab] fp32 tensor is 6.6 GB for 32 rows of 1024 at
Ettin's vocabulary of 50,368). The head's parameter gradients are summed over chunks in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from data_pipelines.objectives import IGNORE
from ettin_jax.models import EttinModel
from pallas_kernels import capacity_for, overflow, pack_masked_tokens
from pallas_kernels.partitioning import current_sharding

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


def loss_sums(model: EttinModel, batch: Batch, *, deterministic: bool,
              dropout_rng: jax.Array | None, mlm_mask_ratio: float | None = None) -> Sums:
    """Summed cross-entropy (fp32) `loss_sum`, target count `targets` and correct predictions
    `correct` of one (micro)batch.

    The head runs on every position with a label, or, given `mlm_mask_ratio` (MLM), on the
    masked positions only, packed with a static capacity for that ratio (`capacity_for`, with
    a margin for Bernoulli masking); then `mlm_overflow` counts masked tokens that did not fit
    (0 unless the data masks far more than its ratio). Under `kernels_sharded_over`, each
    device packs its own rows.
    `dropout_rng`: one key, or one key per row ([rows] keys: each row's dropout masks come
    from its own key, so they do not depend on how rows are grouped or placed).
    """
    inputs = (batch["input_ids"], batch["segment_ids"], batch["positions"])
    if dropout_rng is not None and not deterministic and dropout_rng.ndim == 1:
        def one_row(ids, segments, positions, key):
            return model(ids[None], segments[None], positions[None],
                         deterministic=False, dropout_rng=key)[0]

        hidden = jax.vmap(one_row)(*inputs, dropout_rng)
    else:
        hidden = model(*inputs, deterministic=deterministic, dropout_rng=dropout_rng)
    labels = batch["labels"]
    if mlm_mask_ratio is None:
        return chunked_head_sums(model, hidden, labels, labels != IGNORE)
    return _sparse_mlm_sums(model, hidden, labels, mlm_mask_ratio)


# Positions per chunk of the vocabulary projection: about this many logits (fp32: 256 MiB).
LOGITS_CHUNK_ELEMENTS = 1 << 26


def chunked_head_sums(model: EttinModel, hidden: jax.Array, labels: jax.Array,
                      weights: jax.Array, *, chunk_positions: int | None = None) -> Sums:
    """`cross_entropy_sums(model.logits(hidden), labels, weights)` for hidden [..., H] and
    labels/weights [...], computed on chunks of `chunk_positions` positions (default: about
    LOGITS_CHUNK_ELEMENTS logits per chunk) under a rematerialised scan: the same sums
    (fp32, up to summation order) without [..., vocab] logits in memory. Gradients flow to the
    model's head parameters and to `hidden`; the parameters' gradients are accumulated over
    chunks in fp32 (bf16 parameters are carried as fp32 copies, cast back in each chunk, so
    that only the final sum is rounded)."""
    width = hidden.shape[-1]
    hidden = hidden.reshape(-1, width)
    labels, weights = labels.reshape(-1), weights.reshape(-1)
    positions = hidden.shape[0]
    graph, params = nnx.split(model)
    vocab = model.config.vocab_size
    chunk = chunk_positions or max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    count = max(1, -(-positions // chunk))
    if count == 1:
        return cross_entropy_sums(model.logits(hidden), labels, weights)
    chunk = -(-positions // count)
    pad = count * chunk - positions
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(count, chunk, width)
    labels = jnp.pad(labels, (0, pad)).reshape(count, chunk)
    weights = jnp.pad(weights, (0, pad)).reshape(count, chunk)
    dtypes = jax.tree.map(lambda p: p.dtype, params)
    wide = jax.tree.map(
        lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    @jax.checkpoint
    def chunk_sums(wide, hidden, labels, weights):
        narrow = jax.tree.map(lambda p, dtype: p.astype(dtype), wide, dtypes)
        return cross_entropy_sums(nnx.merge(graph, narrow).logits(hidden), labels, weights)

    def add(total, inputs):
        return jax.tree.map(jnp.add, total, chunk_sums(wide, *inputs)), None

    zeros = {key: jnp.zeros((), jnp.float32) for key in ("loss_sum", "targets", "correct")}
    total, _ = jax.lax.scan(add, zeros, (hidden, labels, weights))
    return total


def _sparse_mlm_sums(model: EttinModel, hidden: jax.Array, labels: jax.Array,
                     mask_ratio: float) -> Sums:
    graph, params = nnx.split(model)
    sharded_over = current_sharding()

    def packed_head(params, hidden, labels):
        rows, seq = labels.shape
        capacity = capacity_for(rows, seq, mask_ratio)
        packed = pack_masked_tokens(hidden, labels != IGNORE, capacity)
        sums = chunked_head_sums(nnx.merge(graph, params), packed.values,
                                 labels.reshape(-1)[packed.indices], packed.valid)
        sums["mlm_overflow"] = overflow(packed, capacity).astype(jnp.float32)
        return sums if sharded_over is None else jax.lax.psum(sums, sharded_over.batch)

    if sharded_over is None:
        return packed_head(params, hidden, labels)
    rows = sharded_over.spec("batch")
    return jax.shard_map(packed_head, mesh=sharded_over.mesh,
                         in_specs=(PartitionSpec(), rows, rows), out_specs=PartitionSpec(),
                         check_vma=False)(params, hidden, labels)


def cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Sums:
    """Weighted sums of the fp32 cross-entropy of `logits` [..., V] against integer `labels`,
    of the weights (`targets`) and of correct argmax predictions (`correct`). Labels where the
    weight is 0 may be anything (ignored)."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    safe_labels = jnp.where(weights > 0, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "targets": jnp.sum(weights),
            "correct": jnp.sum(correct * weights)}
