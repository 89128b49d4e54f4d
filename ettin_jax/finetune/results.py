"""Where fine-tuning results live and how they are read back.

    RUN_DIR/finetune/<task>/<member>/seed<k>/   one fine-tuning run (checkpoints, metrics.jsonl,
                                               results.json, hf/)
    RUN_DIR/finetune/<task>/<member>/summary.json   the seed sweep: every seed's final dev
                                               metrics and their mean, median and spread

`results.json` and `summary.json` are written atomically (a reader never sees half a file); the
comparison report (`ettin_jax.report`) reads only summaries.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ettin_jax.errors import MetricsError
from ettin_jax.storage import write_text_atomically

FINETUNE_DIR = "finetune"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"


def member_dir(run_dir: str | Path, task: str, member: str) -> Path:
    """RUN_DIR/finetune/<task>/<member>."""
    return Path(run_dir) / FINETUNE_DIR / task / member


def seed_dir(run_dir: str | Path, task: str, member: str, seed_index: int) -> Path:
    """RUN_DIR/finetune/<task>/<member>/seed<k>."""
    return member_dir(run_dir, task, member) / f"seed{seed_index}"


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    """One member's results on one task over a seed sweep.

    task, member: what was fine-tuned; headline: the task's main metric; seeds: per seed (in
    seed order) the final dev metrics {name: value}; summary: per metric {mean, median, std,
    min, max, n} over the seeds; settings: the fine-tuning settings used (plain values).
    """

    task: str
    member: str
    headline: str
    seeds: tuple[Mapping[str, float], ...]
    summary: Mapping[str, Mapping[str, float]]
    settings: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON values (what `read_summary` reads back)."""
        return dataclasses.asdict(self) | {"seeds": [dict(s) for s in self.seeds]}


def write_json(path: str | Path, value: Any) -> Path:
    """Writes `value` as JSON to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
    return path


def write_summary(run_dir: str | Path, summary: TaskSummary) -> Path:
    """Writes RUN_DIR/finetune/<task>/<member>/summary.json atomically; returns its path."""
    return write_json(member_dir(run_dir, summary.task, summary.member) / SUMMARY_FILE,
                      summary.as_dict())


def read_summary(path: str | Path) -> TaskSummary:
    """The TaskSummary in `path`. Raises MetricsError naming the file when it is unreadable or
    lacks a field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return TaskSummary(task=raw["task"], member=raw["member"], headline=raw["headline"],
                           seeds=tuple(raw["seeds"]), summary=raw["summary"],
                           settings=raw.get("settings", {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MetricsError(f"{path}: not a fine-tuning summary ({type(err).__name__}: {err}); "
                           f"rerun `ettin-jax finetune` for this task") from None


def read_summaries(run_dir: str | Path) -> list[TaskSummary]:
    """Every summary under RUN_DIR/finetune, sorted by (task, member)."""
    root = Path(run_dir) / FINETUNE_DIR
    return [read_summary(path) for path in sorted(root.glob(f"*/*/{SUMMARY_FILE}"))]
