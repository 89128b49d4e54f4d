"""Contrastive loss (`ettin_jax.finetune.contrastive`): the GradCache gradient equals autodiff
of the unchunked loss, and the loss equals sentence-transformers' MultipleNegativesRankingLoss
and CachedMultipleNegativesRankingLoss (values and gradients with respect to the embeddings)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomized_model, small_config
from flax import nnx

from ettin_jax.finetune.contrastive import contrastive_grads, contrastive_loss, mnrl_loss
from ettin_jax.models.embedding import embed

torch = pytest.importorskip("torch")

QUERIES, DOCUMENTS, QUERY_LEN, DOCUMENT_LEN = 5, 3, 9, 13  # 2 hard negatives per query


def _mask(rng: np.random.Generator, shape: tuple[int, ...], seq: int) -> np.ndarray:
    lengths = rng.integers(2, seq + 1, shape)
    return (np.arange(seq) < lengths[..., None]).astype(np.int32)


def _batch(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    return {
        "query_input_ids": rng.integers(5, vocab, (QUERIES, QUERY_LEN)).astype(np.int32),
        "query_attention_mask": _mask(rng, (QUERIES,), QUERY_LEN),
        "document_input_ids": rng.integers(5, vocab, (QUERIES, DOCUMENTS, DOCUMENT_LEN)
                                           ).astype(np.int32),
        "document_attention_mask": _mask(rng, (QUERIES, DOCUMENTS), DOCUMENT_LEN),
    }


def _st_loss(queries: np.ndarray, documents: np.ndarray, *, scale: float, cached: int = 0):
    """sentence-transformers' loss and its gradients w.r.t. the embeddings (torch autograd)."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    q = torch.tensor(queries, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(documents, dtype=torch.float64, requires_grad=True)
    columns = [q] + [d[:, k] for k in range(documents.shape[1])]
    if cached:
        loss_module = CachedMultipleNegativesRankingLoss.__new__(
            CachedMultipleNegativesRankingLoss)
        torch.nn.Module.__init__(loss_module)
        loss_module.loss = MultipleNegativesRankingLoss(None, scale=scale)
        loss_module.mini_batch_size, loss_module.show_progress_bar = cached, False
        reps = [list(torch.split(c, cached)) for c in columns]
        loss = loss_module.calculate_loss(reps)
    else:
        loss = MultipleNegativesRankingLoss(None, scale=scale).compute_loss_from_embeddings(
            columns, None)
    loss.backward()
    return loss.item(), q.grad.numpy(), d.grad.numpy()


@pytest.mark.parametrize("hard_negatives", [0, 3])
def test_loss_equals_sentence_transformers(rng, hard_negatives):
    rows, hidden = 6, 16
    scale = float(rng.choice([20.0, 7.5]))
    queries = rng.normal(size=(rows, hidden)).astype(np.float32)
    documents = rng.normal(size=(rows, 1 + hard_negatives, hidden)).astype(np.float32)
    documents[:, 0] += 0.8 * queries  # positives close to their queries: a loss well below log N
    # Under jit: one compile instead of one per operation run eagerly.
    ours, (query_grad, document_grad) = jax.jit(jax.value_and_grad(mnrl_loss, argnums=(0, 1)))(
        jnp.asarray(queries), jnp.asarray(documents), scale)
    for cached in (0, 4):
        theirs, their_q, their_d = _st_loss(queries, documents, scale=scale, cached=cached)
        np.testing.assert_allclose(float(ours), theirs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(query_grad, their_q, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(document_grad, their_d, rtol=1e-4, atol=1e-6)


def _assert_trees_close(ours, reference, rtol=1e-5):
    """Leaf by leaf: |ours - ref| <= rtol * (|ref| + max |ref| of the leaf)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours),
                            jax.tree.leaves(reference)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))


# (member, pooling, mini_batch_size, dropout): 2 and 4 divide neither the 5 queries nor the 15
# documents; 16 is more than either (one mini-batch).
GRAD_CASES = [("mlm", "mean", 2, False), ("clm", "lasttoken", 4, True),
              ("clm", "weightedmean", 16, False)]


@pytest.mark.parametrize("objective,pooling,mini_batch_size,dropout", GRAD_CASES,
                         ids=[f"{o}-{p}-mb{m}{'-dropout' if d else ''}"
                              for o, p, m, d in GRAD_CASES])
def test_chunked_gradient_equals_autodiff_of_unchunked_loss(rng, objective, pooling,
                                                            mini_batch_size, dropout):
    config = small_config(num_layers=2, attention_output_dropout=0.2 if dropout else 0.0)
    model = randomized_model(config, objective, int(rng.integers(1 << 30)))
    graph, params = nnx.split(model)
    batch = _batch(rng, config.vocab_size)
    key = jax.random.key(int(rng.integers(1 << 30))) if dropout else None
    scale = 20.0

    reference = jax.jit(jax.value_and_grad(functools.partial(
        contrastive_loss, graph=graph, scale=scale, pooling=pooling)))
    chunked = jax.jit(functools.partial(contrastive_grads, graph=graph, scale=scale,
                                        pooling=pooling, mini_batch_size=mini_batch_size))
    loss, grads = chunked(params, batch=batch, dropout_rng=key)
    ref_loss, ref_grads = reference(params, batch=batch, dropout_rng=key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    _assert_trees_close(grads, ref_grads)
    assert float(np.abs(np.asarray(grads["layers"][1]["mlp"]["Wo"]["kernel"])).max()) > 0

    if dropout:  # dropout is really on: another key, another loss
        other, _ = chunked(params, batch=batch, dropout_rng=jax.random.fold_in(key, 1))
        assert abs(float(other) - float(loss)) > 1e-4
    else:  # the loss is sentence-transformers' on our embeddings
        embed_rows = nnx.jit(functools.partial(embed, pooling=pooling))
        queries = embed_rows(model, batch["query_input_ids"], batch["query_attention_mask"])
        documents = embed_rows(model, batch["document_input_ids"].reshape(-1, DOCUMENT_LEN),
                               batch["document_attention_mask"].reshape(-1, DOCUMENT_LEN))
        theirs, _, _ = _st_loss(np.asarray(queries),
                                np.asarray(documents).reshape(QUERIES, DOCUMENTS, -1),
                                scale=scale)
        np.testing.assert_allclose(float(loss), theirs, rtol=1e-5)


def test_bad_arguments_are_refused(rng):
    config = small_config(num_layers=1)
    graph, params = nnx.split(randomized_model(config, "clm", 0))
    batch = _batch(rng, config.vocab_size)
    grads = functools.partial(contrastive_grads, params, graph, pooling="lasttoken")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
            grads(batch, mini_batch_size=bad)
    with pytest.raises(ValueError, match="missing \\['document_attention_mask'\\]"):
        grads({k: v for k, v in batch.items() if k != "document_attention_mask"},
              mini_batch_size=2)
    with pytest.raises(ValueError, match="\\[B, D, Sd\\] with B = 5"):
        grads({**batch, "document_input_ids": batch["document_input_ids"][:4],
               "document_attention_mask": batch["document_attention_mask"][:4]},
              mini_batch_size=2)
    with pytest.raises(ValueError, match="'cls' is not supported by the decoder"):
        contrastive_grads(params, graph, batch, pooling="cls", mini_batch_size=2)
