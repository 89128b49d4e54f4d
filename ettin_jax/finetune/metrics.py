"""Metrics of a fine-tuned classifier or regressor, as GLUE reports them, and the summary of a
sweep over seeds. Plain numpy; the tests check each against scikit-learn and scipy.

Names (`METRICS`): "accuracy", "f1" (binary, positive class 1), "matthews" (Matthews correlation,
multiclass form), "pearson", "spearman" (ties share their average rank). Values are fractions
(0.85), not percentages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"predictions and labels must be 1-D of the same length, got shapes "
                         f"{predictions.shape} and {labels.shape}")
    if predictions.size == 0:
        raise ValueError("no predictions to score")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of `predictions` (class ids, [n]) equal to `labels` ([n])."""
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions, labels, *, positive: int = 1) -> float:
    """Binary F1 of class `positive`: 2 TP / (2 TP + FP + FN); 0.0 when there is neither a
    predicted nor a true positive (as scikit-learn's default)."""
    predictions, labels = _pair(predictions, labels)
    predicted, true = predictions == positive, labels == positive
    tp = np.sum(predicted & true)
    denominator = 2 * tp + np.sum(predicted & ~true) + np.sum(~predicted & true)
    return float(2 * tp / denominator) if denominator else 0.0


def matthews(predictions, labels) -> float:
    """Matthews correlation coefficient of class ids, in the multiclass form (Gorodkin's R_K,
    scikit-learn's `matthews_corrcoef`; the usual formula for two classes). 0.0 when either
    side holds a single class (the coefficient is undefined there)."""
    predictions, labels = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true, predicted = codes[:labels.size], codes[labels.size:]
    confusion = np.zeros((classes.size, classes.size), np.float64)
    np.add.at(confusion, (true, predicted), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    """Pearson correlation of two real vectors; NaN when either is constant."""
    predictions, labels = _pair(predictions, labels)
    x = predictions.astype(np.float64) - predictions.mean(dtype=np.float64)
    y = labels.astype(np.float64) - labels.mean(dtype=np.float64)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denominator, -1.0, 1.0)) if denominator else float("nan")


def rank(values) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given the average of the ranks they span (as
    `scipy.stats.rankdata`'s default)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start of each run of equal values in sorted order, and the run each element falls in.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], values.size]
    run = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[run]
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman rank correlation: Pearson of the average ranks; NaN when either is constant."""
    predictions, labels = _pair(predictions, labels)
    return pearson(rank(predictions), rank(labels))


_FUNCTIONS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson,
              "spearman": spearman}


def compute_metrics(names: Sequence[str], predictions, labels) -> dict[str, float]:
    """{name: value} for each metric in `names` (see `METRICS`).

    predictions: classification: class ids [n], or scores [n, classes] (the argmax is
      predicted); regression: values [n] or [n, 1].
    labels: [n] class ids or target values.
    Raises ValueError naming an unknown metric or mismatched shapes."""
    unknown = [name for name in names if name not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
    predictions = np.asarray(predictions)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    results = {}
    for name in names:
        values = predictions
        if name in CLASSIFICATION_METRICS and values.ndim == 2:
            values = np.argmax(values, axis=-1)
        results[name] = _FUNCTIONS[name](values, labels)
    return results


def summarize_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over the runs of a seed sweep (each a {metric: value} dict, e.g. from
    `compute_metrics`): {metric: {"mean", "median", "std", "min", "max", "n"}}. `std` is the
    sample standard deviation (ddof 1; 0.0 for one run); `n` counts the runs that report the
    metric. Metrics keep their first-seen order. Raises ValueError for no runs."""
    if not runs:
        raise ValueError("no runs to summarize")
    names = list(dict.fromkeys(name for run in runs for name in run))
    summary = {}
    for name in names:
        values = np.asarray([float(run[name]) for run in runs if name in run], np.float64)
        summary[name] = {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "n": int(values.size),
        }
    return summary
