"""Encoder against decoder, side by side: `ettin-jax compare RUN_DIR [RUN_DIR ...]`.

One report over one or more run directories (several: across sizes): each member's held-out
pretraining metrics (the last evaluation in RUN_DIR/<member>/metrics.jsonl) and every task it
was fine-tuned on (RUN_DIR/finetune/<task>/<member>/summary.json: mean, spread and median over
the seeds), and the zero-shot lm-eval results of each member (the newest
RUN_DIR/lm_eval/<member>/**/results_*.json, `ettin_jax.lm_eval_results`). Written as
REPORT/report.md (Markdown tables) and REPORT/report.png (one panel per task's headline metric,
fine-tuned or zero-shot, and one for the held-out loss, encoder and decoder bars per run),
REPORT being RUN_DIR/report of the first run directory unless given.
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
from ettin_jax.lm_eval_results import (
    HEADLINE_METRICS,
    LM_EVAL_DIR,
    LmEvalResults,
    Score,
    read_member_results,
)
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
    zero_shot: Mapping[str, LmEvalResults] = dataclasses.field(default_factory=dict)  # member


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Comparison:
    """Writes the encoder-vs-decoder report of `run_dirs` into `out` (default: the first run
    directory's report/ folder) and returns what it wrote.

    Raises MetricsError naming the directories when none holds a held-out evaluation, a
    fine-tuning summary or lm-eval results, or naming the file of an unreadable summary or
    lm-eval results file.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [_read_run(path, label) for path, label in zip(paths, _labels(paths))]
    if not any(run.pretraining or run.tasks or run.zero_shot for run in runs):
        raise MetricsError(f"nothing to compare in {', '.join(map(str, paths))}: no held-out "
                           f"evaluation in <member>/{METRICS_FILE}, no fine-tuning summary and "
                           f"no lm-eval results in {LM_EVAL_DIR}/<member> (run `ettin-jax "
                           f"train` with held-out data, `ettin-jax finetune`, `ettin-jax lm-eval "
                           f"... --output_path RUN_DIR/{LM_EVAL_DIR}/<member>`)")
    out_dir = Path(out) if out is not None else paths[0] / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_report(runs)
    markdown = out_dir / MARKDOWN_FILE
    markdown.write_text(text)
    chart = out_dir / CHART_FILE
    _chart(runs).savefig(chart, format="png", metadata={"Software": None})
    return Comparison(markdown=markdown, chart=chart, text=text)


def markdown_report(runs: Sequence[_Run]) -> str:
    """The report's Markdown: a pretraining table (one row per run and member), a
    fine-tuning table and a zero-shot (lm-eval) table (one row per task, metric and run:
    encoder, decoder, difference)."""
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
    lines += _zero_shot_section(runs)
    return "\n".join(lines)


def _zero_shot_section(runs: Sequence[_Run]) -> list[str]:
    """The lm-eval table's lines: per task, metric (headline first) and run, each member's
    score ± lm-eval's standard error and the difference; [] when no run has lm-eval results."""
    tasks = _zero_shot_tasks(runs)
    if not tasks:
        return []
    lines = ["## Zero-shot (lm-eval)", "",
             "| task | metric | run | encoder | decoder | encoder - decoder |",
             "|---|---|---|---|---|---|"]
    for task in tasks:
        for metric, headline in _zero_shot_metrics(runs, task):
            for run in runs:
                if not any(task in r.tasks for r in run.zero_shot.values()):
                    continue
                scores = {m: _zero_shot_score(run, m, task, metric) for m in MEMBERS}
                name = f"**{metric}**" if headline else metric
                encoder, decoder = scores["encoder"], scores["decoder"]
                difference = (f"{encoder.value - decoder.value:+.4f}" if encoder and decoder
                              else "-")
                lines.append(f"| {task} | {name} | {run.label} | {_score(encoder)} | "
                             f"{_score(decoder)} | {difference} |")
    lines += ["", "Bold: the task's headline metric; ±: lm-eval's standard error. Every "
              "setting and figure: the newest RUN_DIR/" + LM_EVAL_DIR + "/<member>/<model>/"
              "results_*.json.", ""]
    return lines


def _zero_shot_tasks(runs: Sequence[_Run]) -> list[str]:
    return sorted({task for run in runs for r in run.zero_shot.values() for task in r.tasks})


def _zero_shot_metrics(runs: Sequence[_Run], task: str) -> list[tuple[str, bool]]:
    """(metric, is headline) of an lm-eval task: the headline (the first of HEADLINE_METRICS
    a file has, else the first file's first metric) first, then the others in the order the
    files list them."""
    found = [r for run in runs for m in MEMBERS
             if (r := run.zero_shot.get(m)) is not None and task in r.tasks]
    headline = next((m for m in HEADLINE_METRICS if any(m in r.tasks[task] for r in found)),
                    found[0].headline(task))
    others = dict.fromkeys(metric for r in found for metric in r.tasks[task] if metric != headline)
    return [(headline, True)] + [(metric, False) for metric in others]


def _zero_shot_score(run: _Run, member: str, task: str, metric: str) -> Score | None:
    results = run.zero_shot.get(member)
    return results.tasks.get(task, {}).get(metric) if results is not None else None


def _score(score: Score | None) -> str:
    if score is None:
        return "-"
    text = f"{score.value:.4f}"
    return text + (f" ± {score.stderr:.4f}" if score.stderr is not None else "")


def _read_run(path: Path, label: str) -> _Run:
    pretraining = {}
    for member in MEMBERS:
        metrics = path / member / METRICS_FILE
        records, _ = read_metrics_file(metrics) if metrics.is_file() else ([], 0)
        evaluated = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
        if evaluated:
            pretraining[member] = evaluated[-1]
    tasks = {(s.task, s.member): s for s in read_summaries(path)}
    zero_shot = {m: r for m in MEMBERS if (r := read_member_results(path, m)) is not None}
    return _Run(label, pretraining, tasks, zero_shot)


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
    """One panel per task (its headline metric), one per lm-eval task (its headline metric)
    and one for the held-out loss; in each, per run, an encoder and a decoder bar (mean, with
    the std over seeds as error bar; lm-eval's standard error for zero-shot tasks)."""
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
    for task in _zero_shot_tasks(runs):
        headline = _zero_shot_metrics(runs, task)[0][0]
        values = []
        for run in runs:
            row = {}
            for member in MEMBERS:
                score = _zero_shot_score(run, member, task, headline)
                row[member] = (score.value, score.stderr or 0.0) if score else None
            values.append(row)
        panels.append((f"{task}: {headline} (zero-shot)", values))
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
