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


def _lm_eval_results(run, member, stamp, results):
    """An lm-eval results file as `lm-eval --output_path RUN/lm_eval/<member>` writes it."""
    path = run / "lm_eval" / member / "runs__demo" / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "results": results, "group_subtasks": {task: [] for task in results},
        "versions": {task: 1.0 for task in results}, "n-shot": {task: 0 for task in results},
        "config": {"model": "ettin-jax", "model_args": f"path={run},member={member}"},
        "date": 1.7e9}, indent=2))
    return path


def _next_line(rng):
    acc, norm = rng.uniform(0.2, 0.6, 2).round(4).tolist()
    return {"alias": "bundled_next_line", "acc,none": acc,
            "acc_stderr,none": round(float(rng.uniform(0.01, 0.03)), 4), "acc_norm,none": norm,
            "acc_norm_stderr,none": round(float(rng.uniform(0.01, 0.03)), 4)}


def test_the_report_shows_lm_eval_results(two_runs, tmp_path):
    rng = np.random.default_rng()
    small, large = two_runs
    written = {}
    for member in ("encoder", "decoder"):
        written[member] = {"bundled_next_line": _next_line(rng), "bundled_perplexity": {
            "alias": "bundled_perplexity",
            "word_perplexity,none": round(float(rng.uniform(50, 500)), 3),
            "word_perplexity_stderr,none": "N/A", "byte_perplexity,none": 2.5,
            "byte_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": round(float(rng.uniform(1, 3)), 4),
            "bits_per_byte_stderr,none": "N/A"}}
        _lm_eval_results(small, member, "2026-11-30T10-00-00.000001", written[member])
    # An older file of the encoder is not read; a second filter is its own metric.
    _lm_eval_results(small, "encoder", "2026-11-29T23-59-59.999999", {
        "bundled_next_line": _next_line(rng)})
    only_decoder = _next_line(rng)
    only_decoder["exact_match,strict-match"] = 0.25
    generation = {"alias": "gen", "exact_match,strict-match": 0.125,
                  "exact_match_stderr,strict-match": 0.0625, "exact_match,flexible-extract": 0.5}
    _lm_eval_results(large, "decoder", "2026-11-30T11-00-00",
                     {"bundled_next_line": only_decoder, "gen": generation})
    report = compare_runs(two_runs, tmp_path / "out")
    text = report.text
    assert "## Zero-shot (lm-eval)" in text
    encoder, decoder = (written[m]["bundled_next_line"] for m in ("encoder", "decoder"))
    for metric, name in (("acc", "**acc**"), ("acc_norm", "acc_norm")):
        row = (f"| bundled_next_line | {name} | small | {encoder[metric + ',none']:.4f} ± "
               f"{encoder[metric + '_stderr,none']:.4f} | {decoder[metric + ',none']:.4f} ± "
               f"{decoder[metric + '_stderr,none']:.4f} | "
               f"{encoder[metric + ',none'] - decoder[metric + ',none']:+.4f} |")
        assert row in text
    assert (f"| bundled_next_line | **acc** | large | - | {only_decoder['acc,none']:.4f} ± "
            f"{only_decoder['acc_stderr,none']:.4f} | - |") in text
    assert "| bundled_next_line | exact_match,strict-match | large | - | 0.2500 | - |" in text
    assert "| bundled_next_line | exact_match,strict-match | small | - | - | - |" in text
    rows = [line for line in text.splitlines() if line.startswith("| bundled_perplexity |")]
    # No acc: bits_per_byte is the headline, then the others as the file lists them; "N/A"
    # standard errors are left out.
    assert [row.split(" | ")[1] for row in rows] == [
        "**bits_per_byte**", "word_perplexity", "byte_perplexity"]
    for row, key in zip(rows, ("bits_per_byte,none", "word_perplexity,none")):
        encoder, decoder = (written[m]["bundled_perplexity"][key] for m in ("encoder", "decoder"))
        assert row.endswith(f" | small | {encoder:.4f} | {decoder:.4f} | "
                            f"{encoder - decoder:+.4f} |")
    assert rows[2] == "| bundled_perplexity | byte_perplexity | small | 2.5000 | 2.5000 | +0.0000 |"
    # Neither: the first metric.
    assert "| gen | **exact_match,strict-match** | large | - | 0.1250 ± 0.0625 | - |" in text
    assert "| gen | exact_match,flexible-extract | large | - | 0.5000 | - |" in text
    lines = text.splitlines()
    assert lines.index("## Zero-shot (lm-eval)") > lines.index(
        "## Fine-tuning, dev set (mean ± std over seeds; median)")
    # Panels: held-out loss, genre, stsb and the three lm-eval tasks, three to a row.
    assert imread(report.chart).shape[:2] == (700, 1350)


def test_lm_eval_results_alone_make_a_report(tmp_path):
    run = tmp_path / "run"
    results = _next_line(np.random.default_rng())
    _lm_eval_results(run, "encoder", "2026-11-30T10-00-00", {"bundled_next_line": results})
    text = compare_runs([run]).text
    assert f"| bundled_next_line | **acc** | run | {results['acc,none']:.4f} ± " in text
    assert "## Pretraining" not in text and "## Fine-tuning" not in text


@pytest.mark.parametrize("content, problem", [
    ('{"results": {"bundled_next_line": {"acc,none": 0.5}', "JSONDecodeError"),
    ('{"config": {}}', "KeyError: 'results'"),
    ('{"results": {"bundled_next_line": 0.5}}', "results\\['bundled_next_line'\\] is a float"),
    ('{"results": {"bundled_next_line": {"alias": "x"}}}', "without any task metric"),
])
def test_an_unreadable_lm_eval_file_is_an_error_naming_it(two_runs, content, problem):
    path = _lm_eval_results(two_runs[0], "decoder", "2026-11-30T10-00-00", {})
    path.write_text(content)
    with pytest.raises(MetricsError, match=f"{path}: .*{problem}"):
        compare_runs(two_runs)
