"""plot_run / figure_for_run on synthetic run directories: the PNG, the report, the drawn data,
and the damaged or empty inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ettin_jax.plotting import (
    DPI, FIGSIZE, MetricsError, figure_for_run, phase_boundaries, plot_run)
from ettin_jax.training.metrics import read_metrics_file as read_metrics

# (name, first step, last step) of each phase; records every 10 steps.
PHASES = (("pretrain", 10, 150), ("extension", 160, 250), ("decay", 260, 300))
EVAL_EVERY = 50


def _records(seed: int) -> list[dict]:
    """Three phases of noisy, decaying losses (10 -> ~0.5, so the axis must go log)."""
    rng = np.random.default_rng(seed)
    records, tokens = [], 0
    for phase, first, last in PHASES:
        for step in range(first, last + 1, 10):
            tokens += int(rng.integers(30_000, 40_960))
            loss = 10.0 * np.exp(-step / 100) + 0.5 * float(rng.random())
            record = {"step": step, "loss": loss, "accuracy": float(rng.random()),
                      "learning_rate": 1e-3 * float(rng.random()), "tokens": tokens,
                      "phase": phase}
            if step % EVAL_EVERY == 0:
                record["eval_loss"] = loss + float(rng.random())
            records.append(record)
    return records


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list[dict]]:
    """An encoder-only run whose last line was cut by a kill; no decoder folder."""
    records = _records(seed=1234)
    _write(tmp_path / "encoder" / "metrics.jsonl", records, tail='{"step": 310, "loss": 0.4')
    return tmp_path, records


def _first_of_each_phase(records: list[dict], x: str) -> tuple[tuple[float, str], ...]:
    firsts = {}
    for record in records:
        firsts.setdefault(record["phase"], float(record[x]))
    return tuple((where, name) for name, where in firsts.items())


def test_plot_run_writes_png_and_reports(run):
    run_dir, records = run
    with pytest.warns(UserWarning, match=r"encoder.metrics\.jsonl: skipped 1 unparsable"):
        report = plot_run(run_dir)
    assert report.path == run_dir / "plots" / "training.png"
    with Image.open(report.path) as image:
        assert image.format == "PNG"
        assert image.size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert dict(report.records) == {"encoder": len(records), "decoder": 0}
    assert dict(report.skipped) == {"encoder": 1, "decoder": 0}
    assert report.boundaries["encoder"] == ((10.0, "pretrain"), (160.0, "extension"),
                                            (260.0, "decay"))
    assert report.boundaries["decoder"] == ()


def test_plot_run_against_tokens_to_a_chosen_path(run):
    run_dir, records = run
    out = run_dir / "elsewhere" / "deep" / "curves.png"
    with pytest.warns(UserWarning):
        report = plot_run(run_dir, out, x="tokens")
    assert report.path == out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.boundaries["encoder"] == _first_of_each_phase(records, "tokens")
    assert report.boundaries["encoder"][1][0] != 160.0  # tokens, not steps


def test_figure_draws_the_records(run):
    run_dir, records = run
    with pytest.warns(UserWarning):
        figure = figure_for_run(run_dir)
    encoder_loss, decoder_loss, encoder_lr, decoder_lr = figure.axes
    assert encoder_loss.get_title() == "encoder (MLM)"
    assert decoder_loss.get_title() == "decoder (CLM)"
    lines = {line.get_label(): line for line in encoder_loss.get_lines()}
    np.testing.assert_array_equal(lines["train loss"].get_xdata(), [r["step"] for r in records])
    np.testing.assert_array_equal(lines["train loss"].get_ydata(), [r["loss"] for r in records])
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 6 and lines["eval loss"].get_linestyle() == "None"
    np.testing.assert_array_equal(lines["eval loss"].get_xdata(), [r["step"] for r in evals])
    np.testing.assert_array_equal(lines["eval loss"].get_ydata(), [r["eval_loss"] for r in evals])
    assert encoder_loss.get_yscale() == "log"
    (lr_line,) = [line for line in encoder_lr.get_lines() if line.get_label() == "learning rate"]
    np.testing.assert_array_equal(lr_line.get_ydata(), [r["learning_rate"] for r in records])
    for axes in (encoder_loss, encoder_lr):
        dashed = [line.get_xdata()[0] for line in axes.get_lines()
                  if line.get_linestyle() == "--"]
        assert dashed == [10, 160, 260]
    assert {"pretrain", "extension", "decay"} <= {t.get_text().strip() for t in encoder_loss.texts}
    for axes in (decoder_loss, decoder_lr):
        assert not axes.get_lines()
        assert [t.get_text() for t in axes.texts] == ["no metrics"]


def test_narrow_loss_range_stays_linear_and_unphased_files_have_no_boundaries(tmp_path):
    records = [{"step": s, "loss": 2.0 + 0.01 * s, "learning_rate": 1e-4, "tokens": 100 * s}
               for s in range(1, 6)]
    _write(tmp_path / "decoder" / "metrics.jsonl", records)
    figure = figure_for_run(tmp_path)
    decoder_loss = figure.axes[1]
    assert decoder_loss.get_yscale() == "linear"
    assert not [line for line in decoder_loss.get_lines() if line.get_linestyle() == "--"]
    assert [t.get_text() for t in figure.axes[0].texts] == ["no metrics"]
    report = plot_run(tmp_path)
    assert dict(report.boundaries) == {"encoder": (), "decoder": ()}
    assert dict(report.skipped) == {"encoder": 0, "decoder": 0}


def test_read_metrics_skips_damaged_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n\n{"step": 2, "lo\n[1, 2]\n{"loss": 1.0}\n'
                    '{"step": 3, "loss": NaN}\n{"step": 4, "loss": 2.')
    records, skipped = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3]
    assert skipped == 4  # the cut line, a list, a record without step, the cut last line
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "absent.jsonl")


def test_phase_boundaries_only_at_changes_of_named_phases():
    records = [{"step": 1}, {"step": 2, "phase": "a"}, {"step": 3, "phase": "a"},
               {"step": 4, "phase": "b"}, {"step": 5}, {"step": 6, "phase": "b"}]
    assert phase_boundaries(records) == [(2.0, "a"), (4.0, "b"), (6.0, "b")]
    assert phase_boundaries([{"step": 1}, {"step": 2}]) == []


def test_empty_run_dir_names_the_directory(tmp_path):
    with pytest.raises(MetricsError, match=re.escape(f"run directory {tmp_path}")):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_only_garbage_lines_fail_naming_the_files(tmp_path):
    path = tmp_path / "encoder" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1, "lo')
    with pytest.warns(UserWarning), pytest.raises(MetricsError, match=re.escape(str(path))):
        plot_run(tmp_path)


def test_tokens_axis_needs_tokens_in_every_record(tmp_path):
    path = tmp_path / "encoder" / "metrics.jsonl"
    _write(path, [{"step": 1, "loss": 1.0, "tokens": 10}, {"step": 2, "loss": 1.0}])
    with pytest.raises(MetricsError, match=re.escape(f"{path}: 1 of 2 records lack 'tokens'")):
        plot_run(tmp_path, x="tokens")
    with pytest.raises(ValueError, match="x must be"):
        plot_run(tmp_path, x="epoch")
