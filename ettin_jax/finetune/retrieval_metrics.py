"""Retrieval metrics of a run against relevance judgements, as trec_eval computes them, and the
exact top-k ranking of a corpus by embedding similarity.

A run is {qid: {docid: score}}, qrels {qid: {docid: relevance}} (integers; graded). Per query,
trec_eval ranks the run's documents by score, descending, ties broken by docid descending
(byte order of the strings: "b" before "a", "9" before "10"); a document is relevant when its
relevance is >= 1. At cutoff k (names "<metric>@<k>"):

- ndcg@k: trec_eval's ndcg_cut.k: DCG of the top k with gain = relevance (linear; <= 0
  counts 0) and discount log2(rank + 1), over the DCG of the ideal ranking of all judged
  documents (0 when no judged document has a positive relevance).
- mrr@k: trec_eval's recip_rank of the run cut to its top k (as BEIR reports MRR@k): 1/rank of
  the first relevant document within the top k, else 0.
- recall@k: trec_eval's recall.k: relevant documents in the top k over all relevant ones.
- map@k: trec_eval's map_cut.k: the sum of the precision at the rank of each relevant
  document in the top k, over all relevant documents.
- precision@k: trec_eval's P.k: relevant documents in the top k over k.

A query without relevant documents scores 0 on all of them; a query of qrels that the run lacks
scores 0 (as `trec_eval -c`); queries of the run that qrels lacks, or judges no document of,
are ignored. Averages are over the queries that qrels judges. Checked against pytrec_eval
in tests/test_retrieval_metrics.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

METRIC_KINDS = ("ndcg", "mrr", "recall", "map", "precision")
DEFAULT_K_VALUES = (1, 5, 10, 100)
SIMILARITIES = ("cosine", "dot")
_NAME = re.compile(r"^(ndcg|mrr|recall|map|precision)@([1-9][0-9]*)$")

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def parse_metric(name: str) -> tuple[str, int]:
    """(kind, k) of a metric name such as "ndcg@10". Raises ValueError naming the name and the
    valid forms when it is not one."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"unknown retrieval metric {name!r}; valid: "
                         f"{', '.join(f'{kind}@K' for kind in METRIC_KINDS)} (K >= 1)")
    return match.group(1), int(match.group(2))


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """The docids of one query's {docid: score} in trec_eval's ranking order: score
    descending, ties by docid descending. Raises ValueError for a NaN score."""
    for docid, score in scores.items():
        if math.isnan(score):
            raise ValueError(f"document {docid!r} has a NaN score")
    by_docid = sorted(scores, reverse=True)
    return sorted(by_docid, key=lambda docid: -float(scores[docid]))  # stable: keeps ties


def query_metrics(scores: Mapping[str, float], judged: Mapping[str, int],
                  k_values: Sequence[int] = DEFAULT_K_VALUES) -> dict[str, float]:
    """The metrics of one query (see the module docstring): {"ndcg@k", "mrr@k", "recall@k",
    "map@k", "precision@k"} for every k of `k_values`, from its run `scores` {docid: score}
    and its judgements `judged` {docid: relevance}."""
    ks = _k_values(k_values)
    ranking = trec_order(scores)[:max(ks)]
    relevances = np.asarray([judged.get(docid, 0) for docid in ranking], np.float64)
    hit = relevances >= 1
    num_relevant = sum(1 for relevance in judged.values() if relevance >= 1)
    gains = np.maximum(relevances, 0.0)
    discounts = 1.0 / np.log2(np.arange(2, len(ranking) + 2))
    ideal = np.sort(np.maximum(np.asarray(list(judged.values()), np.float64), 0.0))[::-1]
    ideal_discounts = 1.0 / np.log2(np.arange(2, len(ideal) + 2))
    hits_so_far = np.cumsum(hit)
    precision_at_hits = np.where(hit, hits_so_far / np.arange(1, len(ranking) + 1), 0.0)
    first_hit = int(np.argmax(hit)) + 1 if hit.any() else None
    values: dict[str, float] = {}
    for k in ks:
        idcg = float(np.sum(ideal[:k] * ideal_discounts[:k]))
        dcg = float(np.sum(gains[:k] * discounts[:k]))
        hits = int(hits_so_far[min(k, len(ranking)) - 1]) if ranking else 0
        values[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        values[f"mrr@{k}"] = 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0
        values[f"recall@{k}"] = hits / num_relevant if num_relevant else 0.0
        values[f"map@{k}"] = (float(np.sum(precision_at_hits[:k])) / num_relevant
                              if num_relevant else 0.0)
        values[f"precision@{k}"] = hits / k
    return values


def per_query_metrics(run: Mapping[str, Mapping[str, float]], qrels: Qrels,
                      k_values: Sequence[int] = DEFAULT_K_VALUES) -> dict[str, dict[str, float]]:
    """{qid: `query_metrics`} for every query that `qrels` judges (a non-empty {docid:
    relevance}; trec_eval knows no query without judgements), in its order; a query the run
    lacks is ranked as an empty run: all 0."""
    return {qid: query_metrics(run.get(qid, {}), judged, k_values)
            for qid, judged in qrels.items() if judged}


def retrieval_metrics(run: Mapping[str, Mapping[str, float]], qrels: Qrels,
                      k_values: Sequence[int] = DEFAULT_K_VALUES) -> dict[str, float]:
    """The mean over the queries that `qrels` judges of every metric of `query_metrics` ("ndcg@10",
    "mrr@10", "recall@100", "map@10", "precision@10", ...), grouped by kind, ks ascending.
    Raises ValueError for empty qrels or a k < 1."""
    table = per_query_metrics(run, qrels, k_values)
    if not table:
        raise ValueError("qrels judge no query")
    ks = _k_values(k_values)
    return {name: float(np.mean([values[name] for values in table.values()]))
            for name in (f"{kind}@{k}" for kind in METRIC_KINDS for k in ks)}


def _k_values(k_values: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in k_values))
    if not ks or ks[0] < 1:
        raise ValueError(f"k_values must be integers >= 1, got {tuple(k_values)}")
    return ks


# --- ranking a corpus --------------------------------------------------------------------------


def rank_corpus(query_embeddings, corpus_embeddings, top_k: int, *,
                query_ids: Sequence[str] | None = None,
                corpus_ids: Sequence[str] | None = None, similarity: str = "cosine",
                corpus_chunk_size: int = 8192, query_chunk_size: int = 1024) -> Run:
    """The run {qid: {docid: score}} of the `top_k` best documents of the corpus for every
    query, in rank order, by the similarity of their embeddings ([queries, dim] and
    [documents, dim] arrays, numpy or anything `np.asarray` takes): "cosine" (each vector
    divided by max(norm, 1e-12), as sentence-transformers' cos_sim) or "dot". ids default to
    "0", "1", ...

    Exact: the documents kept are the first `top_k` of trec_eval's order of the full ranking
    (score descending, ties by docid descending), so metrics at k <= top_k are those of the
    full ranking, whatever the chunk sizes. Memory: blocks of [query_chunk_size,
    corpus_chunk_size] scores in float32 (float64 when both inputs are), never the full
    matrix. Raises ValueError for mismatched shapes or ids, non-finite embeddings, an empty
    corpus, top_k < 1 or an unknown similarity."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; valid: {', '.join(SIMILARITIES)}")
    queries = np.asarray(query_embeddings)
    corpus = np.asarray(corpus_embeddings)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embeddings must be [queries, dim] and [documents, dim] with the same "
                         f"dim, got {queries.shape} and {corpus.shape}")
    if corpus.shape[0] == 0:
        raise ValueError("the corpus is empty")
    if top_k < 1 or corpus_chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"top_k and chunk sizes must be >= 1, got top_k={top_k}, "
                         f"corpus_chunk_size={corpus_chunk_size}, "
                         f"query_chunk_size={query_chunk_size}")
    query_ids = _ids(query_ids, len(queries), "query_ids")
    corpus_ids = _ids(corpus_ids, len(corpus), "corpus_ids")
    dtype = np.float64 if queries.dtype == corpus.dtype == np.float64 else np.float32
    # Rank of each document among equal scores: trec_eval puts the larger docid first.
    tie_rank = np.empty(len(corpus_ids), np.int64)
    tie_rank[sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__, reverse=True)] = \
        np.arange(len(corpus_ids))
    k = min(top_k, len(corpus))
    run: Run = {}
    for q_start in range(0, len(queries), query_chunk_size):
        block = _prepared(queries[q_start:q_start + query_chunk_size], dtype, similarity,
                          "query", q_start)
        best_index = np.zeros((len(block), 0), np.int64)
        best_score = np.zeros((len(block), 0), dtype)
        for c_start in range(0, len(corpus), corpus_chunk_size):
            docs = _prepared(corpus[c_start:c_start + corpus_chunk_size], dtype, similarity,
                             "corpus", c_start)
            scores = block @ docs.T
            index = _top_k(scores, tie_rank[c_start:c_start + len(docs)], k) + c_start
            candidates = np.concatenate([best_index, index], axis=1)
            candidate_scores = np.concatenate(
                [best_score, np.take_along_axis(scores, index - c_start, axis=1)], axis=1)
            order = np.lexsort((tie_rank[candidates], -candidate_scores), axis=-1)[:, :k]
            best_index = np.take_along_axis(candidates, order, axis=1)
            best_score = np.take_along_axis(candidate_scores, order, axis=1)
        for row in range(len(block)):
            run[query_ids[q_start + row]] = {
                corpus_ids[i]: float(s) for i, s in zip(best_index[row], best_score[row])}
    return run


def _ids(ids: Sequence[str] | None, count: int, name: str) -> list[str]:
    if ids is None:
        return [str(i) for i in range(count)]
    ids = [str(i) for i in ids]
    if len(ids) != count:
        raise ValueError(f"{name}: {len(ids)} ids for {count} embeddings")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: ids are not unique")
    return ids


def _prepared(vectors: np.ndarray, dtype, similarity: str, what: str, start: int) -> np.ndarray:
    vectors = vectors.astype(dtype, copy=False)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what} embedding {start + int(np.argmin(finite))} is not finite")
    if similarity == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def _top_k(scores: np.ndarray, tie_rank: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best of each row of `scores` (unordered), ties at the boundary
    resolved by the smaller `tie_rank`."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part[:, k - 1:k], axis=1)
    # argpartition breaks ties at the k-th value arbitrarily: where more than k scores reach
    # it, choose exactly (rare with real embeddings).
    crowded = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    for row in crowded:
        part[row] = np.lexsort((tie_rank, -scores[row]))[:k]
    return part
