"""The training losses, as sums: causal LM (every position with a target) and masked LM (the
head on the masked positions only, Ettin's sparse prediction). One home for both, used by the
train step and by held-out evaluation.

Losses are cross-entropy in fp32 whatever the compute dtype, returned as sums with their target
count so that microbatches and devices add up to the full batch's mean exactly.
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
    (0 unless the data masks far more than its ratio). Under `kernels_sharded_over`, each device packs its own rows.
    """
    hidden = model(batch["input_ids"], batch["segment_ids"], batch["positions"],
                   deterministic=deterministic, dropout_rng=dropout_rng)
    labels = batch["labels"]
    if mlm_mask_ratio is None:
        return cross_entropy_sums(model.logits(hidden), labels, labels != IGNORE)
    return _sparse_mlm_sums(model, hidden, labels, mlm_mask_ratio)


def _sparse_mlm_sums(model: EttinModel, hidden: jax.Array, labels: jax.Array,
                     mask_ratio: float) -> Sums:
    graph, params = nnx.split(model)
    sharded_over = current_sharding()

    def packed_head(params, hidden, labels):
        rows, seq = labels.shape
        capacity = capacity_for(rows, seq, mask_ratio)
        packed = pack_masked_tokens(hidden, labels != IGNORE, capacity)
        sums = cross_entropy_sums(nnx.merge(graph, params).logits(packed.values),
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
