"""ettin_jax.finetune.retrieval_metrics against pytrec_eval (trec_eval's own code) on random runs
with ties, graded and negative relevance, queries without relevant documents and queries the
run lacks; rank_corpus against the full similarity matrix in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from ettin_jax.finetune.retrieval_metrics import (
    METRIC_KINDS, parse_metric, per_query_metrics, rank_corpus, retrieval_metrics, trec_order,
)

KS = (1, 2, 3, 5, 10, 30)
TREC_NAMES = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "precision": "P"}


def random_case(rng: np.random.Generator, queries: int = 40, documents: int = 120):
    """(run, qrels) with integer scores (many ties), docids of mixed lengths (so string order
    differs from numeric order), relevance -1..3, some queries with no relevant or no judged
    document, some qrels queries missing from the run and some run queries not judged."""
    docids = [f"d{int(i)}" for i in rng.choice(10 * documents, documents, replace=False)]
    run, qrels = {}, {}
    for q in range(queries):
        qid = f"q{q}"
        judged = rng.choice(documents, int(rng.integers(0, 12)), replace=False)
        qrels[qid] = {docids[i]: int(rng.integers(-1, 4)) for i in judged}
        if rng.random() < 0.1:
            continue  # the run lacks this query
        retrieved = rng.choice(documents, int(rng.integers(1, 50)), replace=False)
        # Coarse scores, so that ties are common; sometimes a relevant document scores high.
        run[qid] = {docids[i]: float(rng.integers(0, 6)) * 0.5 for i in retrieved}
        for docid in qrels[qid]:
            if rng.random() < 0.3:
                run[qid][docid] = float(rng.integers(0, 6))
    run["unjudged"] = {docids[0]: 1.0}
    return run, qrels


def reference(run, qrels, ks):
    """pytrec_eval's per-query values in our names (MRR@k from recip_rank: it counts only when
    the first relevant document is within the top k)."""
    measures = {f"{name}.{','.join(map(str, ks))}" for name in TREC_NAMES.values()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures | {"recip_rank"})
    table = {}
    for qid, values in evaluator.evaluate(run).items():
        row = {f"{kind}@{k}": values[f"{name}_{k}"] for kind, name in TREC_NAMES.items()
               for k in ks}
        rr = values["recip_rank"]
        row.update({f"mrr@{k}": rr if rr > 0 and round(1 / rr) <= k else 0.0 for k in ks})
        table[qid] = row
    return table


def test_metrics_match_pytrec_eval(rng):
    for _ in range(5):
        run, qrels = random_case(rng)
        expected = reference(run, qrels, KS)
        mine = per_query_metrics(run, qrels, KS)
        judged = {qid for qid, j in qrels.items() if j}
        assert set(mine) == judged
        assert set(expected) == judged & set(run)  # pytrec_eval skips queries the run lacks
        for qid in judged:
            for name, value in mine[qid].items():
                want = expected[qid][name] if qid in expected else 0.0
                assert value == pytest.approx(want, abs=1e-12), (qid, name)
        # Averages: over the judged queries, a query the run lacks counting 0 (trec_eval -c).
        means = retrieval_metrics(run, qrels, KS)
        assert list(means) == [f"{kind}@{k}" for kind in METRIC_KINDS for k in KS]
        for name, value in means.items():
            total = sum(row[name] for row in expected.values())
            assert value == pytest.approx(total / len(judged), abs=1e-12), name


def test_graded_relevance_and_ties_by_hand():
    # trec_eval: score descending, ties by docid descending as strings ("b" > "a", "9" > "10").
    assert trec_order({"a": 1.0, "b": 1.0, "10": 1.0, "9": 1.0, "z": 0.5}) == \
        ["b", "a", "9", "10", "z"]
    run = {"q": {"a": 2.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"a": 2, "c": 1, "x": 3}}
    values = per_query_metrics(run, qrels, (1, 3))["q"]
    # Ranking b, a, c: gains 0, 2, 1; ideal 3, 2, 1.
    dcg = 2 / np.log2(3) + 1 / np.log2(4)
    assert values["ndcg@3"] == pytest.approx(dcg / (3 + 2 / np.log2(3) + 1 / np.log2(4)))
    assert values["ndcg@1"] == 0.0
    assert values["mrr@1"] == 0.0 and values["mrr@3"] == 0.5
    assert values["recall@3"] == pytest.approx(2 / 3)
    assert values["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert values["precision@3"] == pytest.approx(2 / 3)


def test_parse_metric_and_errors():
    assert parse_metric("ndcg@10") == ("ndcg", 10)
    assert parse_metric("recall@100") == ("recall", 100)
    for bad in ("ndcg", "ndcg@0", "hits@10", "NDCG@10", "mrr@-1"):
        with pytest.raises(ValueError, match="unknown retrieval metric"):
            parse_metric(bad)
    with pytest.raises(ValueError, match="judge no query"):
        retrieval_metrics({"q": {"a": 1.0}}, {"q": {}})
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metrics({}, {"q": {"a": 1}}, (0, 10))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics({"q": {"a": float("nan")}}, {"q": {"a": 1}})


def full_ranking(queries, corpus, similarity, query_ids, corpus_ids, top_k):
    """The reference: the whole [queries, corpus] matrix in float64, each row in trec order."""
    q, c = np.asarray(queries, np.float64), np.asarray(corpus, np.float64)
    if similarity == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    scores = q @ c.T
    return {qid: trec_order(dict(zip(corpus_ids, row)))[:top_k]
            for qid, row in zip(query_ids, scores)}, scores


@pytest.mark.parametrize("chunks", [(7, 3), (1000, 1000), (64, 5), (1, 2)])
def test_rank_corpus_exact_with_ties(rng, chunks):
    corpus_chunk, query_chunk = chunks
    # Small integer vectors: many exactly tied dot products, exact in float32.
    queries = rng.integers(-2, 3, (23, 5)).astype(np.float32)
    corpus = rng.integers(-2, 3, (301, 5)).astype(np.float32)
    query_ids = [f"query-{i}" for i in range(len(queries))]
    corpus_ids = [f"{int(i)}" for i in rng.permutation(10_000)[:len(corpus)]]
    run = rank_corpus(queries, corpus, 10, query_ids=query_ids, corpus_ids=corpus_ids,
                      similarity="dot", corpus_chunk_size=corpus_chunk,
                      query_chunk_size=query_chunk)
    expected, scores = full_ranking(queries, corpus, "dot", query_ids, corpus_ids, 10)
    assert list(run) == query_ids
    for row, qid in enumerate(query_ids):
        assert list(run[qid]) == expected[qid]
        for docid, score in run[qid].items():
            assert score == scores[row, corpus_ids.index(docid)]


def test_rank_corpus_cosine_and_metrics(rng):
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    corpus = rng.normal(size=(250, 16)).astype(np.float32) * rng.uniform(0.1, 10, (250, 1))
    qids = [f"q{i}" for i in range(40)]
    dids = [f"d{i}" for i in range(250)]
    run = rank_corpus(queries, corpus, 30, query_ids=qids, corpus_ids=dids,
                      corpus_chunk_size=37, query_chunk_size=16)
    expected, scores = full_ranking(queries, corpus, "cosine", qids, dids, 30)
    qrels = {qid: {dids[int(i)]: int(rng.integers(1, 3)) for i in rng.choice(250, 3)}
             for qid in qids}
    full_run = {qid: dict(zip(dids, map(float, row))) for qid, row in zip(qids, scores)}
    for qid in qids:
        assert list(run[qid]) == expected[qid]
        assert np.allclose([run[qid][d] for d in expected[qid]],
                           [full_run[qid][d] for d in expected[qid]], atol=1e-6)
    # Metrics at k <= top_k are those of the whole ranking.
    cut = retrieval_metrics(run, qrels, (1, 10, 30))
    whole = retrieval_metrics(full_run, qrels, (1, 10, 30))
    assert cut == pytest.approx(whole, abs=1e-6)
    # Default ids, top_k beyond the corpus, float64 inputs.
    small = rank_corpus(queries[:2].astype(np.float64), corpus[:5].astype(np.float64), 100)
    assert list(small) == ["0", "1"] and all(len(docs) == 5 for docs in small.values())


def test_rank_corpus_errors(rng):
    queries, corpus = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    with pytest.raises(ValueError, match="same dim"):
        rank_corpus(queries, corpus[:, :3], 2)
    with pytest.raises(ValueError, match="similarity"):
        rank_corpus(queries, corpus, 2, similarity="l2")
    with pytest.raises(ValueError, match="corpus_ids: 2 ids for 6"):
        rank_corpus(queries, corpus, 2, corpus_ids=["a", "b"])
    with pytest.raises(ValueError, match="not unique"):
        rank_corpus(queries, corpus, 2, query_ids=["a", "a", "b"])
    corpus[4, 1] = np.nan
    with pytest.raises(ValueError, match="corpus embedding 4 is not finite"):
        rank_corpus(queries, corpus, 2, corpus_chunk_size=3)
    with pytest.raises(ValueError, match="top_k"):
        rank_corpus(queries, corpus, 0)
