"""lm-eval results of a run directory: where `ettin-jax lm-eval` writes them for `compare`, and
how they are read.

Convention: the evaluation of a member writes to RUN_DIR/lm_eval/<member> (`output_dir`), e.g.

    ettin-jax lm-eval --model ettin-jax --model_args path=RUN_DIR,member=encoder \\
        --tasks bundled_corpus --output_path RUN_DIR/lm_eval/encoder

lm-eval then writes RUN_DIR/lm_eval/<member>/<model name>/results_<timestamp>.json; the newest
such file (by its timestamp) is the member's zero-shot result (`read_member_results`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ettin_jax.errors import MetricsError

LM_EVAL_DIR = "lm_eval"
RESULTS_GLOB = "results_*.json"
# A task's headline: the first of these it has, else its first metric. bits_per_byte before
# lm-eval's first perplexity metric, word_perplexity: no tokenizer in it, and a readable scale.
HEADLINE_METRICS = ("acc", "bits_per_byte")
_NO_FILTER = "none"


@dataclasses.dataclass(frozen=True)
class Score:
    """One metric of one task: its value and lm-eval's standard error (None: not given)."""

    value: float
    stderr: float | None


@dataclasses.dataclass(frozen=True)
class LmEvalResults:
    """One member's lm-eval results file: task -> metric -> Score, in the file's order.

    A metric is named as lm-eval's "metric,filter" key with the default filter "none" left out
    ("acc", "acc_norm", "word_perplexity", "exact_match,strict-match")."""

    path: Path
    tasks: Mapping[str, Mapping[str, Score]]

    def headline(self, task: str) -> str:
        """The task's headline metric: the first of HEADLINE_METRICS it has, else its first
        metric."""
        metrics = list(self.tasks[task])
        return next((m for m in HEADLINE_METRICS if m in metrics), metrics[0])


def output_dir(run_dir: str | Path, member: str) -> Path:
    """Where a member's lm-eval evaluation writes (its --output_path): RUN_DIR/lm_eval/<member>."""
    return Path(run_dir) / LM_EVAL_DIR / member


def newest_results_file(directory: str | Path) -> Path | None:
    """The newest lm-eval results file anywhere under `directory` (lm-eval names them
    results_<ISO timestamp>.json, so the greatest name is the newest; the path breaks ties), or
    None when there is none (or no such directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.rglob(RESULTS_GLOB) if p.is_file()]
    return max(files, key=lambda p: (p.name, str(p))) if files else None


def read_member_results(run_dir: str | Path, member: str) -> LmEvalResults | None:
    """The member's newest lm-eval results under RUN_DIR/lm_eval/<member>, or None when it has
    none. Raises MetricsError naming the file when it is not an lm-eval results file."""
    path = newest_results_file(output_dir(run_dir, member))
    return read_results_file(path) if path is not None else None


def read_results_file(path: str | Path) -> LmEvalResults:
    """The tasks and metrics of an lm-eval results file (its "results" section: per task,
    "metric,filter" keys with numbers and "metric_stderr,filter" keys with the standard error
    or "N/A"). Tasks without a numeric metric (a group's header) are left out.

    Raises MetricsError naming the file when it is not JSON, has no "results" object, or
    holds no task with a metric."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        results = data["results"]
        if not isinstance(results, dict):
            raise TypeError(f"'results' is a {type(results).__name__}, not an object")
        tasks = {}
        for task, entry in results.items():
            if not isinstance(entry, dict):
                raise TypeError(f"results[{task!r}] is a {type(entry).__name__}, not an object")
            metrics = _metrics(entry)
            if metrics:
                tasks[str(task)] = metrics
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MetricsError(f"{path}: not an lm-eval results file ({type(err).__name__}: {err})"
                           f"; rerun `ettin-jax lm-eval ... --output_path` or remove it") from err
    if not tasks:
        raise MetricsError(f"{path}: an lm-eval results file without any task metric")
    return LmEvalResults(path=path, tasks=tasks)


def _metrics(entry: Mapping[str, Any]) -> dict[str, Score]:
    metrics = {}
    for key, value in entry.items():
        name, sep, filter_ = str(key).partition(",")
        if not sep or name.endswith("_stderr") or not _is_number(value):
            continue
        stderr = entry.get(f"{name}_stderr,{filter_}")
        label = name if filter_ == _NO_FILTER else f"{name},{filter_}"
        metrics[label] = Score(float(value),
                               float(stderr) if _is_number(stderr) else None)
    return metrics


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
