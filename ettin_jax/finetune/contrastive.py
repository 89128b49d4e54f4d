"""Bi-encoder contrastive loss (sentence-transformers' MultipleNegativesRankingLoss) and its
GradCache gradient (CachedMultipleNegativesRankingLoss), as pure, jit-able functions.

    graph, params = nnx.split(model)
    step = jax.jit(functools.partial(contrastive_grads, graph=graph, mini_batch_size=32,
                                     scale=20.0, pooling="mean"))
    loss, grads = step(params, batch=batch, dropout_rng=key)

A batch (`ContrastiveBatch`, numpy or jax arrays) holds B examples of a query, its positive
document and 0 or more hard negatives:
  query_input_ids, query_attention_mask          int [B, Sq]
  document_input_ids, document_attention_mask    int [B, D, Sd]; document 0 of an example is
                                                 its positive, 1..D-1 its hard negatives
ids with the member's special tokens (`data_pipelines.special_tokens.with_special_tokens`),
padding on the right, mask 1 on tokens.

The loss, as sentence-transformers 6.2 computes it by default (directions ("query_to_doc",),
partition "joint", no hardness weighting; not symmetric): every query is scored against all
B * D documents of the batch (every positive and every hard negative, its own and the other
examples'), s_ij = scale * cos(q_i, d_j); loss = mean_i [logsumexp_j s_ij - s_i,pos(i)].

GradCache (Gao et al. 2021; what CachedMultipleNegativesRankingLoss does), in
`contrastive_grads`: (1) embed all queries and documents in mini-batches of `mini_batch_size`
rows without building a backward pass; (2) the loss and its gradient with respect to the
embeddings; (3) embed each mini-batch again under `jax.vjp` and pull its slice of the embedding
gradient back to the parameters, summing over mini-batches (a `jax.lax.scan`, so XLA holds one
mini-batch's activations at a time). Each row has its own dropout key, the same in (1) and (3)
(sentence-transformers replays the RNG state with RandContext; here the key is a function of
the row), so the result equals `jax.grad(contrastive_loss)` for any mini_batch_size, up to
float summation order. A mini-batch size that does not divide the rows is allowed: the last
mini-batches are filled with repeated rows whose embedding gradient is zero.

Mini-batch k holds the rows k, k + n, k + 2n, ... (n = number of mini-batches), a strided
split: when the rows are sharded over devices in contiguous blocks and the devices divide
mini_batch_size, every mini-batch is spread over all devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ettin_jax.models.embedding import embed, l2_normalize

ContrastiveBatch = Mapping[str, jax.Array]
BATCH_KEYS: tuple[str, ...] = ("query_input_ids", "query_attention_mask",
                               "document_input_ids", "document_attention_mask")
DEFAULT_SCALE = 20.0  # sentence-transformers' default (temperature 0.05), as Ettin trained


def mnrl_loss(query_embeddings: jax.Array, document_embeddings: jax.Array,
              scale: float = DEFAULT_SCALE) -> jax.Array:
    """float32 scalar: MultipleNegativesRankingLoss of embeddings (module docstring).

    query_embeddings [B, H]; document_embeddings [B, D, H] (document 0 of row i is query i's
    positive). Cosine similarity is computed as sentence-transformers' `cos_sim`
    (each vector divided by max(norm, 1e-12)). Raises ValueError for mismatched shapes.
    """
    if query_embeddings.ndim != 2 or document_embeddings.ndim != 3 or (
            document_embeddings.shape[0] != query_embeddings.shape[0]
            or document_embeddings.shape[2] != query_embeddings.shape[1]):
        raise ValueError(f"expected query embeddings [B, H] and document embeddings "
                         f"[B, D, H], got {tuple(query_embeddings.shape)} and "
                         f"{tuple(document_embeddings.shape)}")
    rows, per_query, hidden = document_embeddings.shape
    queries = l2_normalize(query_embeddings.astype(jnp.float32))
    documents = l2_normalize(document_embeddings.astype(jnp.float32)).reshape(-1, hidden)
    scores = scale * jnp.einsum("qh,dh->qd", queries, documents,
                                precision=jax.lax.Precision.HIGHEST)
    positives = jnp.arange(rows) * per_query  # row i's positive in the flattened documents
    return optax.softmax_cross_entropy_with_integer_labels(scores, positives).mean()


def contrastive_loss(params, graph: nnx.GraphDef, batch: ContrastiveBatch, *,
                     scale: float = DEFAULT_SCALE, pooling: str,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
    """float32 scalar: the loss of `batch` for the model nnx.merge(graph, params), embedding
    every row in one call (the reference `contrastive_grads` is checked against).

    pooling: the member's embedding pooling (`ettin_jax.models.embedding.MEMBER_POOLINGS`).
    dropout_rng: None evaluates without dropout; with a key, query row i uses
      fold_in(fold_in(key, 0), i) and flattened document row j (= example * D + document)
      fold_in(fold_in(key, 1), j).
    Raises ValueError for a missing batch key, inconsistent shapes or a pooling the member does
    not support.
    """
    model = nnx.merge(graph, params)
    queries, documents = _rows(batch)
    query_keys, document_keys = _row_keys(dropout_rng, queries[0].shape[0],
                                          documents[0].shape[0])
    deterministic = dropout_rng is None
    query_embeddings = embed(model, *queries, pooling, deterministic=deterministic,
                             row_keys=query_keys)
    document_embeddings = embed(model, *documents, pooling, deterministic=deterministic,
                                row_keys=document_keys)
    rows = queries[0].shape[0]
    return mnrl_loss(query_embeddings, document_embeddings.reshape(rows, -1,
                                                                   query_embeddings.shape[1]),
                     scale)


def contrastive_grads(params, graph: nnx.GraphDef, batch: ContrastiveBatch, *,
                      mini_batch_size: int, scale: float = DEFAULT_SCALE, pooling: str,
                      dropout_rng: jax.Array | None = None):
    """(loss, grads): `contrastive_loss` and its gradient with respect to `params` (the same
    pytree structure and dtypes), computed with GradCache (module docstring) so that memory
    follows mini_batch_size rows, not the batch.

    Args are those of `contrastive_loss`, plus mini_batch_size: rows embedded at a time (for
    queries and documents alike), any positive integer. graph, mini_batch_size, scale and
    pooling must be static under jit. Gradients are summed over mini-batches in float32.
    Raises ValueError for a mini_batch_size that is not a positive integer, and what
    `contrastive_loss` raises.
    """
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or (
            mini_batch_size < 1):
        raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
    queries, documents = _rows(batch)
    rows = queries[0].shape[0]
    query_keys, document_keys = _row_keys(dropout_rng, rows, documents[0].shape[0])
    deterministic = dropout_rng is None

    def embed_rows(p, ids, mask, keys):
        return embed(nnx.merge(graph, p), ids, mask, pooling, deterministic=deterministic,
                     row_keys=keys)

    query_chunks = _chunk((*queries, query_keys), mini_batch_size)
    document_chunks = _chunk((*documents, document_keys), mini_batch_size)

    # (1) Embeddings of every row, mini-batch by mini-batch, without a backward pass.
    def embeddings(chunks, count):
        out = jax.lax.map(lambda xs: embed_rows(params, *xs), chunks)
        return _unchunk(out, count)

    query_embeddings = embeddings(query_chunks, rows)
    document_embeddings = embeddings(document_chunks, documents[0].shape[0])

    # (2) The loss and its gradient with respect to the embeddings.
    hidden = query_embeddings.shape[1]
    loss, (query_grad, document_grad) = jax.value_and_grad(
        lambda q, d: mnrl_loss(q, d.reshape(rows, -1, hidden), scale), argnums=(0, 1))(
        query_embeddings, document_embeddings)

    # (3) Each mini-batch again, its embedding gradient pulled back to the parameters.
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    for chunks, cotangent in ((query_chunks, query_grad), (document_chunks, document_grad)):
        cotangent_chunks = _chunk((cotangent,), mini_batch_size, pad_value=0.0)[0]

        def accumulate(acc, xs):
            ids, mask, keys, cot = xs
            _, pull_back = jax.vjp(lambda p: embed_rows(p, ids, mask, keys), params)
            (grads,) = pull_back(cot)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), None

        total, _ = jax.lax.scan(accumulate, total, (*chunks, cotangent_chunks))
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), total, params)
    return loss, grads


def _rows(batch: ContrastiveBatch):
    """((query ids, mask) [B, Sq], (document ids, mask) [B * D, Sd]) with the shape checks."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"contrastive batch is missing {missing}; it needs {list(BATCH_KEYS)}")
    query_ids, query_mask = (jnp.asarray(batch[k]) for k in BATCH_KEYS[:2])
    document_ids, document_mask = (jnp.asarray(batch[k]) for k in BATCH_KEYS[2:])
    if query_ids.ndim != 2 or query_mask.shape != query_ids.shape:
        raise ValueError(f"query_input_ids and query_attention_mask must both be [B, Sq], got "
                         f"{tuple(query_ids.shape)} and {tuple(query_mask.shape)}")
    if (document_ids.ndim != 3 or document_mask.shape != document_ids.shape
            or document_ids.shape[0] != query_ids.shape[0]):
        raise ValueError(f"document_input_ids and document_attention_mask must both be "
                         f"[B, D, Sd] with B = {query_ids.shape[0]} queries, got "
                         f"{tuple(document_ids.shape)} and {tuple(document_mask.shape)}")
    flat = (-1, document_ids.shape[2])
    return (query_ids, query_mask), (document_ids.reshape(flat), document_mask.reshape(flat))


def _row_keys(dropout_rng: jax.Array | None, queries: int, documents: int):
    """Per-row dropout keys of queries and flattened documents (None, None without a key)."""
    if dropout_rng is None:
        return None, None

    def keys(stream: int, count: int) -> jax.Array:
        base = jax.random.fold_in(dropout_rng, stream)
        return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(count))

    return keys(0, queries), keys(1, documents)


def _chunk(arrays: tuple, mini_batch_size: int, pad_value=None) -> tuple:
    """Each array [R, ...] as [n, m, ...] mini-batches, n = ceil(R / m), m = min(size, R);
    mini-batch k holds rows k, k + n, ... The n * m - R extra rows repeat the first rows
    (pad_value None) or are pad_value. None entries stay None."""
    def split(array):
        if array is None:
            return None
        rows = array.shape[0]
        size = min(mini_batch_size, rows)
        count = math.ceil(rows / size)
        extra = count * size - rows
        if extra:
            if pad_value is None:
                filler = array[jnp.arange(extra) % rows]
            else:
                filler = jnp.full((extra, *array.shape[1:]), pad_value, array.dtype)
            array = jnp.concatenate([array, filler])
        return jnp.swapaxes(array.reshape(size, count, *array.shape[1:]), 0, 1)

    return tuple(split(array) for array in arrays)


def _unchunk(chunks: jax.Array, rows: int) -> jax.Array:
    """The inverse of `_chunk`: [n, m, ...] -> the first `rows` rows [rows, ...]."""
    flat = jnp.swapaxes(chunks, 0, 1)
    return flat.reshape(-1, *flat.shape[2:])[:rows]
