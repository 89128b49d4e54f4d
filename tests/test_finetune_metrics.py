"""ettin_jax.finetune.metrics against scikit-learn and scipy on random predictions."""

from __future__ import annotations

import statistics
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from ettin_jax.finetune.metrics import (
    accuracy, compute_metrics, f1, matthews, pearson, rank, spearman, summarize_seeds,
)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_classification_metrics_match_sklearn(rng, classes):
    for _ in range(20):
        n = int(rng.integers(1, 200))
        labels = rng.integers(0, classes, n)
        # Predictions that agree with the labels more or less often, sometimes not at all.
        agree = rng.random(n) < rng.random()
        predictions = np.where(agree, labels, rng.integers(0, classes, n))
        assert accuracy(predictions, labels) == pytest.approx(
            skm.accuracy_score(labels, predictions), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns on one class or a 0/0 F1
            expected_mcc = skm.matthews_corrcoef(labels, predictions)
            expected_f1 = skm.f1_score(labels == 1, predictions == 1, zero_division=0.0)
        assert matthews(predictions, labels) == pytest.approx(expected_mcc, abs=1e-12)
        assert f1(predictions, labels) == pytest.approx(expected_f1, abs=1e-12)


def test_degenerate_classifications_match_sklearn(rng):
    labels = rng.integers(0, 2, 50)
    for predictions in (np.zeros(50, int), np.ones(50, int), labels, 1 - labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert matthews(predictions, labels) == pytest.approx(
                skm.matthews_corrcoef(labels, predictions), abs=1e-12)
            assert f1(predictions, labels) == pytest.approx(
                skm.f1_score(labels, predictions, zero_division=0.0), abs=1e-12)
    # No positive anywhere: sklearn's 0/0 F1 is 0; a single class on both sides: MCC 0.
    zeros = np.zeros(10, int)
    assert f1(zeros, zeros) == 0.0 and matthews(zeros, zeros) == 0.0


def test_correlations_match_scipy_with_ties(rng):
    for _ in range(20):
        n = int(rng.integers(3, 300))
        labels = rng.normal(size=n) * rng.uniform(0.1, 5)
        predictions = rng.uniform(-1, 1) * labels + rng.normal(size=n)
        # Ties on both sides: STS-B's labels are on a coarse grid, a model's outputs may repeat.
        tied_labels = np.round(labels * 2) / 2
        tied_predictions = np.round(predictions)
        for p, y in ((predictions, labels), (tied_predictions, tied_labels)):
            if np.ptp(p) == 0 or np.ptp(y) == 0:
                continue
            assert pearson(p, y) == pytest.approx(scipy.stats.pearsonr(p, y)[0], abs=1e-10)
            assert spearman(p, y) == pytest.approx(scipy.stats.spearmanr(p, y)[0], abs=1e-10)
        np.testing.assert_allclose(rank(tied_predictions), scipy.stats.rankdata(tied_predictions))


def test_constant_input_correlation_is_nan(rng):
    values = rng.normal(size=20)
    assert np.isnan(pearson(np.full(20, 2.5), values))
    assert np.isnan(spearman(values, np.ones(20)))


def test_compute_metrics_takes_ids_logits_or_values(rng):
    labels = rng.integers(0, 3, 64)
    logits = rng.normal(size=(64, 3))
    got = compute_metrics(["accuracy", "matthews"], logits, labels)
    predicted = logits.argmax(-1)
    assert got == pytest.approx({"accuracy": skm.accuracy_score(labels, predicted),
                                 "matthews": skm.matthews_corrcoef(labels, predicted)})
    assert list(got) == ["accuracy", "matthews"]
    assert compute_metrics(["accuracy"], predicted, labels) == pytest.approx(
        {"accuracy": got["accuracy"]})
    targets = rng.uniform(0, 5, 40)
    outputs = targets[:, None] + rng.normal(size=(40, 1))
    got = compute_metrics(["pearson", "spearman"], outputs, targets)
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(outputs[:, 0], targets)[0])
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(outputs[:, 0], targets)[0])


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        compute_metrics(["accuracy", "auc"], [1], [1])
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_summarize_seeds(rng):
    runs = [{"accuracy": float(rng.random()), "f1": float(rng.random())} for _ in range(5)]
    runs.append({"accuracy": float(rng.random())})  # a run that did not report F1
    summary = summarize_seeds(runs)
    assert list(summary) == ["accuracy", "f1"]
    for name, stats in summary.items():
        values = [run[name] for run in runs if name in run]
        assert stats["n"] == len(values)
        assert stats["mean"] == pytest.approx(statistics.fmean(values))
        assert stats["median"] == pytest.approx(statistics.median(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values))
        assert (stats["min"], stats["max"]) == (min(values), max(values))
    one = summarize_seeds([{"accuracy": 0.5}])["accuracy"]
    assert one == {"mean": 0.5, "median": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    with pytest.raises(ValueError, match="no runs"):
        summarize_seeds([])
