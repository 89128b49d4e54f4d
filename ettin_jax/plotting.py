"""Training curves of a run directory: `ettin-jax plot RUN_DIR`.

Reads RUN_DIR/{encoder,decoder}/metrics.jsonl (written by ettin_jax.training.metrics.MetricsLog)
and draws one PNG: a 2 x 2 grid, columns encoder | decoder, rows loss | learning rate, with a
dashed line where each phase starts. Rendering uses the Agg canvas on a bare Figure, so it needs
no display and leaves pyplot's global state (and any backend a caller chose) untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ettin_jax import storage
from ettin_jax.errors import MetricsError
from ettin_jax.training.metrics import METRICS_FILE, read_metrics_file

XAxis = Literal["step", "tokens"]
MEMBERS = {"encoder": "encoder (MLM)", "decoder": "decoder (CLM)"}
DEFAULT_PLOT = Path("plots") / "training.png"
FIGSIZE = (12.0, 7.0)
DPI = 100
# Loss curves span more than this factor (max / min) are drawn on a log y-axis.
LOG_SCALE_RANGE = 10.0


@dataclass(frozen=True)
class PlotReport:
    """What plot_run drew. Every mapping holds both members ("encoder", "decoder").

    path: the PNG written. records: parsed records per member (0 where the file is missing).
    boundaries: per member, (x value, phase name) of the first record of each phase, in the
    x-axis kind plotted. skipped: unparsable lines per member.
    """

    path: Path
    records: Mapping[str, int]
    boundaries: Mapping[str, tuple[tuple[float, str], ...]]
    skipped: Mapping[str, int]


def phase_boundaries(records: Sequence[Mapping[str, Any]], x: XAxis = "step"
                     ) -> list[tuple[float, str]]:
    """Where each phase starts: (record[x], phase name) for every record whose "phase" differs
    from the previous record's (the first record included), in record order.

    Records without a "phase" key (older files) belong to an unnamed phase, which gets no
    boundary: a file without phases yields []. Raises KeyError when a boundary record lacks `x`.
    """
    boundaries, previous = [], None
    for record in records:
        phase = record.get("phase")
        if phase != previous and phase is not None:
            boundaries.append((float(record[x]), str(phase)))
        previous = phase
    return boundaries


def figure_for_run(run_dir: str | Path, *, x: XAxis = "step") -> Figure:
    """The plot of `run_dir` as a matplotlib Figure (Agg canvas attached, not saved).

    Axes are `figure.axes` in row-major order: encoder loss, decoder loss, encoder learning
    rate, decoder learning rate. Lines carry labels "train loss", "eval loss" (markers only)
    and "learning rate". Raises MetricsError (and ValueError for an unknown x) as plot_run does.
    """
    run = _read_run(storage.path(run_dir), x)
    return _draw(run, x)


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, x: XAxis = "step"
             ) -> PlotReport:
    """Draws the training curves of `run_dir` into one PNG and returns what it drew.

    out defaults to RUN_DIR/plots/training.png; its folder is created. x picks the x-axis of
    all four panels: the global "step" or the member's cumulative "tokens". A member without a
    metrics file, or without records, gets empty panels saying "no metrics". Unparsable lines
    are skipped with a UserWarning per file that counts them. Raises MetricsError, naming
    `run_dir` and the files looked at, when neither member has a record, or naming the file
    when x="tokens" and a record lacks "tokens"; ValueError for any other x.
    """
    run_dir = storage.path(run_dir)
    run = _read_run(run_dir, x)
    path = storage.path(out) if out is not None else run_dir / DEFAULT_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = _draw(run, x)
    storage.write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    return PlotReport(
        path=path,
        records=MappingProxyType({m: len(member.records) for m, member in run.items()}),
        boundaries=MappingProxyType(
            {m: tuple(phase_boundaries(member.records, x)) for m, member in run.items()}),
        skipped=MappingProxyType({m: member.skipped for m, member in run.items()}))


@dataclass(frozen=True)
class _Member:
    path: Path
    records: tuple[dict[str, Any], ...]
    skipped: int


def _read_run(run_dir: Path, x: XAxis) -> dict[str, _Member]:
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    run = {}
    for member in MEMBERS:
        path = run_dir / member / METRICS_FILE
        records, skipped = read_metrics_file(path) if path.is_file() else ([], 0)
        if skipped:
            warnings.warn(f"{path}: skipped {skipped} unparsable line(s)", UserWarning,
                          stacklevel=3)
        lacking = sum(x not in record for record in records)
        if lacking:
            raise MetricsError(f"{path}: {lacking} of {len(records)} records lack {x!r}; "
                               f"plot against 'step' instead")
        run[member] = _Member(path, tuple(records), skipped)
    if not any(member.records for member in run.values()):
        looked = ", ".join(str(member.path) for member in run.values())
        raise MetricsError(f"no metrics records in run directory {run_dir} (looked at {looked})")
    return run


def _draw(run: Mapping[str, _Member], x: XAxis) -> Figure:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 2, sharex="col", squeeze=False)
    for column, (member, title) in enumerate(MEMBERS.items()):
        loss_axes, lr_axes = grid[0][column], grid[1][column]
        loss_axes.set_title(title)
        loss_axes.set_ylabel("loss")
        lr_axes.set_ylabel("learning rate")
        lr_axes.set_xlabel(x)
        records = run[member].records
        if not records:
            for axes in (loss_axes, lr_axes):
                axes.text(0.5, 0.5, "no metrics", transform=axes.transAxes,
                          ha="center", va="center", color="gray")
                axes.set_xticks([])
                axes.set_yticks([])
            continue
        losses = _series(records, x, "loss")
        evals = _series(records, x, "eval_loss")
        loss_axes.plot(*losses, linewidth=1.0, label="train loss")
        if evals[0]:
            loss_axes.plot(*evals, linestyle="none", marker="o", markersize=4, label="eval loss")
            loss_axes.legend(loc="lower left", fontsize=8)  # phase names sit at the top
        if _spans_decade(losses[1] + evals[1]):
            loss_axes.set_yscale("log")
        lr_axes.plot(*_series(records, x, "learning_rate"), linewidth=1.0,
                     label="learning rate")
        for where, name in phase_boundaries(records, x):
            for axes in (loss_axes, lr_axes):
                axes.axvline(where, linestyle="--", linewidth=0.8, color="gray")
            loss_axes.text(where, 0.98, f" {name}", transform=loss_axes.get_xaxis_transform(),
                           rotation=90, ha="right", va="top", fontsize=8, color="dimgray")
    return figure


def _series(records: Sequence[Mapping[str, Any]], x: XAxis, key: str
            ) -> tuple[list[float], list[float]]:
    """(xs, ys) over the records that hold a number under `key`."""
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(float(record[x]))
            ys.append(float(value))
    return xs, ys


def _spans_decade(values: Sequence[float]) -> bool:
    # Non-positive values would vanish on a log axis, so they keep the axis linear.
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > LOG_SCALE_RANGE
