"""`ettin-jax compare`: the encoder-vs-decoder report of one or more run directories."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from matplotlib.image import imread

from ettin_jax.cli import main
from ettin_jax.errors import MetricsError
from ettin_jax.finetune.results import TaskSummary, read_summaries, write_summary
from ettin_jax.report import compare_runs


def _summary(task, member, values, headline="accuracy", other=None):
    per_seed = [{headline: v, **({other: v / 2} if other else {})} for v in values]

    def stats(xs):
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs),
                "std": statistics.pstdev(xs), "min": min(xs), "max": max(xs), "n": len(xs)}

    summary = {headline: stats(values)}
    if other:
        summary[other] = stats([v / 2 for v in values])
    return TaskSummary(task=task, member=member, headline=headline, seeds=tuple(per_seed),
                       summary=summary, settings={"learning_rate": 5e-5})


def _metrics(member_dir, records):
    member_dir.mkdir(parents=True)
    (member_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng()
    runs = []
    for name in ("small", "large"):
        run = tmp_path / name
        for member in ("encoder", "decoder"):
            _metrics(run / member, [
                {"step": 10, "loss": 3.0, "tokens": 1000},
                {"step": 20, "loss": 2.5, "tokens": 2000, "eval_loss": float(rng.uniform(2, 3)),
                 "eval_accuracy": 0.4, "eval_perplexity": 10.0},
                {"step": 25, "loss": 2.4, "tokens": 2500}])
            values = rng.uniform(0.5, 0.9, 3).round(4).tolist()
            write_summary(run, _summary("genre", member, values, other="f1"))
        runs.append(run)
    write_summary(runs[0], _summary("stsb", "encoder", [0.8], headline="pearson"))
    return runs


def test_the_report_puts_both_members_side_by_side(two_runs, tmp_path):
    report = compare_runs(two_runs, tmp_path / "out")
    text = report.markdown.read_text()
    assert text == report.text
    for run in two_runs:
        for member in ("encoder", "decoder"):
            evaluated = json.loads((run / member / "metrics.jsonl").read_text().splitlines()[1])
            # the last evaluation, not the last record
            assert f"| {run.name} | {member} | 20 | 2000 | {evaluated['eval_loss']:.4f} |" in text
        summaries = {s.member: s for s in read_summaries(run) if s.task == "genre"}
        encoder, decoder = (summaries[m].summary["accuracy"] for m in ("encoder", "decoder"))
        row = (f"| genre | **accuracy** | {run.name} | {encoder['mean']:.4f} ± "
               f"{encoder['std']:.4f} (median {encoder['median']:.4f}, 3 seeds) | "
               f"{decoder['mean']:.4f} ± {decoder['std']:.4f} (median {decoder['median']:.4f}, "
               f"3 seeds) | {encoder['mean'] - decoder['mean']:+.4f} |")
        assert row in text
    assert "| genre | f1 | small |" in text  # other metrics after the headline
    assert "| stsb | **pearson** | small | 0.8000 | - | - |" in text  # a member not fine-tuned
    assert "| stsb | **pearson** | large |" not in text
    image = imread(report.chart)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_one_run_reports_into_its_own_folder(two_runs, capsys):
    assert main(["compare", str(two_runs[0])]) == 0
    printed = capsys.readouterr().out
    assert (two_runs[0] / "report" / "report.md").read_text() in printed
    assert (two_runs[0] / "report" / "report.png").is_file()


def test_nothing_to_compare_is_an_error_naming_the_directories(tmp_path):
    (tmp_path / "empty" / "encoder").mkdir(parents=True)
    with pytest.raises(MetricsError, match=f"nothing to compare in {tmp_path / 'empty'}"):
        compare_runs([tmp_path / "empty"])
    broken = tmp_path / "broken" / "finetune" / "genre" / "encoder" / "summary.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{\"task\": \"genre\"")
    with pytest.raises(MetricsError, match=f"{broken}: not a fine-tuning summary"):
        compare_runs([tmp_path / "broken"])
