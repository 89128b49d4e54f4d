"""Encoder against decoder, side by side: `ettin-jax compare RUN_DIR [RUN_DIR ...]`.

One report over one or more run directories (several: across sizes): each member's held-out
pretraining metrics (the last evaluation in RUN_DIR/<member>/metrics.jsonl) and every task it
was fine-tuned on (RUN_DIR/finetune/<task>/<member>/summary.json: mean, spread and median over
the seeds). Written as REPORT/report.md (Markdown tables) and REPORT/report.png (one panel per
task's headline metric and one for the held-out loss, encoder and decoder bars per run), REPORT
being RUN_DIR/report of the first run directory unless given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ettin_jax.config.schema import MEMBERS
from ettin_jax.errors import MetricsError
from ettin_jax.finetune.results import TaskSummary, read_summaries
from ettin_jax.training.metrics import METRICS_FILE, read_metrics_file

REPORT_DIR = "report"
MARKDOWN_FILE = "report.md"
CHART_FILE = "report.png"
COLORS = {"encoder": "tab:blue", "decoder": "tab:orange"}
PRETRAINING_KEYS = ("eval_loss", "eval_accuracy", "eval_perplexity")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `compare_runs` wrote: the Markdown file, the chart, and the Markdown text."""

    markdown: Path
    chart: Path
    text: str


@dataclasses.dataclass(frozen=True)
class _Run:
    label: str
    pretraining: Mapping[str, Mapping[str, Any]]  # member -> the last evaluated record
    tasks: Mapping[tuple[str, str], TaskSummary]  # (task, member) -> summary


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Comparison:
    """Writes the encoder-vs-decoder report of `run_dirs` into `out` (default: the first run
    directory's report/ folder) and returns what it wrote.

    Raises MetricsError naming the directories when none holds a held-out evaluation or a
    fine-tuning summary, or naming the file of an unreadable summary.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [_read_run(path, label) for path, label in zip(paths, _labels(paths))]
    if not any(run.pretraining or run.tasks for run in runs):
        raise MetricsError(f"nothing to compare in {', '.join(map(str, paths))}: no held-out "
                           f"evaluation in <member>/{METRICS_FILE} and no fine-tuning summary "
                           f"(run `ettin-jax train` with held-out data, `ettin-jax finetune`)")
    out_dir = Path(out) if out is not None else paths[0] / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_report(runs)
    markdown = out_dir / MARKDOWN_FILE
    markdown.write_text(text)
    chart = out_dir / CHART_FILE
    _chart(runs).savefig(chart, format="png", metadata={"Software": None})
    return Comparison(markdown=markdown, chart=chart, text=text)


def markdown_report(runs: Sequence[_Run]) -> str:
    """The report's Markdown: a pretraining table (one row per run and member) and a
    fine-tuning table (one row per task, metric and run: encoder, decoder, difference)."""
    lines = ["# Encoder vs decoder", ""]
    pretraining = [(run, member, run.pretraining[member]) for run in runs for member in MEMBERS
                   if member in run.pretraining]
    if pretraining:
        lines += ["## Pretraining, held-out data (last evaluation)", "",
                  "| run | member | step | tokens | eval loss | eval accuracy | eval perplexity |",
                  "|---|---|---|---|---|---|---|"]
        for run, member, record in pretraining:
            cells = [_number(record.get(key)) for key in PRETRAINING_KEYS]
            lines.append(f"| {run.label} | {member} | {record.get('step', '')} | "
                         f"{record.get('tokens', '')} | {' | '.join(cells)} |")
        lines.append("")
    tasks = sorted({task for run in runs for task, _ in run.tasks})
    if tasks:
        lines += ["## Fine-tuning, dev set (mean ± std over seeds; median)", "",
                  "| task | metric | run | encoder | decoder | encoder - decoder |",
                  "|---|---|---|---|---|---|"]
        for task in tasks:
            for metric, headline in _task_metrics(runs, task):
                for run in runs:
                    found = {m: run.tasks.get((task, m)) for m in MEMBERS}
                    if not any(found.values()):
                        continue
                    stats = {m: s.summary.get(metric) if s else None for m, s in found.items()}
                    name = f"**{metric}**" if headline else metric
                    lines.append(f"| {task} | {name} | {run.label} | "
                                 f"{_spread(stats['encoder'])} | {_spread(stats['decoder'])} | "
                                 f"{_difference(stats['encoder'], stats['decoder'])} |")
        lines += ["", "Bold: the task's headline metric. Settings and every seed's figures: "
                  "RUN_DIR/finetune/<task>/<member>/summary.json.", ""]
    return "\n".join(lines)


def _read_run(path: Path, label: str) -> _Run:
    pretraining = {}
    for member in MEMBERS:
        metrics = path / member / METRICS_FILE
        records, _ = read_metrics_file(metrics) if metrics.is_file() else ([], 0)
        evaluated = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
        if evaluated:
            pretraining[member] = evaluated[-1]
    tasks = {(s.task, s.member): s for s in read_summaries(path)}
    return _Run(label, pretraining, tasks)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each run's name in the report: its folder name, or its path where names repeat."""
    names = [path.name or str(path) for path in paths]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(paths, names)]


def _task_metrics(runs: Sequence[_Run], task: str) -> list[tuple[str, bool]]:
    """(metric, is headline) of `task`, the headline first, then the others by name."""
    summaries = [s for run in runs for (t, _), s in run.tasks.items() if t == task]
    headline = summaries[0].headline
    others = sorted({name for s in summaries for name in s.summary} - {headline})
    return [(headline, True)] + [(name, False) for name in others]


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _spread(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "-"
    seeds = int(stats.get("n", 1))
    text = f"{stats['mean']:.4f}"
    if seeds > 1:
        text += f" ± {stats['std']:.4f} (median {stats['median']:.4f}, {seeds} seeds)"
    return text


def _difference(encoder: Mapping[str, float] | None, decoder: Mapping[str, float] | None) -> str:
    if not encoder or not decoder:
        return "-"
    return f"{encoder['mean'] - decoder['mean']:+.4f}"


def _chart(runs: Sequence[_Run]) -> Figure:
    """One panel per task (its headline metric) and one for the held-out loss; in each, per
    run, an encoder and a decoder bar (mean, with the std over seeds as error bar)."""
    panels: list[tuple[str, list[dict[str, tuple[float, float] | None]]]] = []
    if any(run.pretraining for run in runs):
        panels.append(("held-out loss (pretraining)", [
            {m: (float(run.pretraining[m]["eval_loss"]), 0.0) if m in run.pretraining else None
             for m in MEMBERS} for run in runs]))
    for task in sorted({task for run in runs for task, _ in run.tasks}):
        headline = _task_metrics(runs, task)[0][0]
        values = []
        for run in runs:
            row: dict[str, tuple[float, float] | None] = {}
            for member in MEMBERS:
                summary = run.tasks.get((task, member))
                stats = summary.summary.get(headline) if summary else None
                row[member] = (stats["mean"], stats.get("std", 0.0)) if stats else None
            values.append(row)
        panels.append((f"{task}: {headline}", values))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.5 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False)
    width = 0.38
    for index, (title, values) in enumerate(panels):
        axes = grid[index // columns][index % columns]
        axes.set_title(title, fontsize=10)
        for offset, member in zip((-width / 2, width / 2), MEMBERS):
            xs = [i + offset for i, row in enumerate(values) if row[member]]
            heights = [row[member][0] for row in values if row[member]]
            errors = [row[member][1] for row in values if row[member]]
            axes.bar(xs, heights, width, yerr=errors, capsize=3, color=COLORS[member],
                     label=member)
        axes.set_xticks(range(len(runs)), [run.label for run in runs], fontsize=8)
        if index == 0:
            axes.legend(fontsize=8)
    for index in range(len(panels), rows * columns):
        grid[index // columns][index % columns].set_axis_off()
    return figure
