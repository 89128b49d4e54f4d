"""Training metrics: one JSON object per logged step in metrics.jsonl, TensorBoard event files
(tensorboardX: no TensorFlow), a progress bar, and the MFU estimate.

In object storage (a gs:// or s3:// run directory) an object cannot be appended to:
metrics.jsonl and the TensorBoard event files (written to a local directory) are uploaded
whole, at most every `UPLOAD_SECONDS` and whenever the run saves a checkpoint
(`MetricsLog.flush`), so the records of every step up to the last checkpoint are there after a
crash. Each upload replaces the object at once."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

from tqdm import tqdm

from ettin_jax import storage
from ettin_jax.errors import first_line
from ettin_jax.storage import PathLike, write_text_atomically

METRICS_FILE = "metrics.jsonl"
UPLOAD_SECONDS = 30.0  # the most time between uploads of metrics.jsonl to object storage


class MetricsLog:
    """Appends records to MEMBER_DIR/metrics.jsonl (only where `enabled`, i.e. on process 0).

    On a resumed run, records past the restored step are dropped first, so the file never holds
    a step twice. `progress` (total, done) sets the progress bar: steps, or tokens for a run
    bounded by tokens only; `advance` moves it in the same unit.
    """

    def __init__(self, member_dir: PathLike, *, resume_step: int, desc: str,
                 progress: tuple[int, int], enabled: bool = True, tensorboard: bool = True):
        member_dir = storage.path(member_dir)
        self.path = member_dir / METRICS_FILE
        self.enabled = enabled
        self._events = None
        # In object storage: every line of the file, where the event files are written before
        # their upload, and when both were last uploaded.
        self._lines: list[str] | None = None
        self._events_dir = member_dir / "events"
        self._local_events: str | None = None
        self._uploaded = time.monotonic()
        if enabled:
            member_dir.mkdir(parents=True, exist_ok=True)
            kept = [json.dumps(r) + "\n" for r in read_metrics(member_dir)
                    if r["step"] <= resume_step]
            write_text_atomically(self.path, "".join(kept))
            if storage.is_remote(self.path):
                self._lines = kept
            if tensorboard:
                from tensorboardX import SummaryWriter

                events = str(self._events_dir)
                if storage.is_remote(events):
                    events = self._local_events = tempfile.mkdtemp(prefix="ettin-jax-events-")
                self._events = SummaryWriter(events, purge_step=resume_step + 1)
        total, done = progress
        self._bar = tqdm(total=total, initial=done, desc=desc, unit_scale=True,
                         disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        """Writes one record (must hold `step` and `loss`)."""
        if self.enabled:
            if self._lines is None:
                with open(self.path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            else:
                self._lines.append(json.dumps(record) + "\n")
                if time.monotonic() - self._uploaded >= UPLOAD_SECONDS:
                    self.flush()
            if self._events is not None:
                for name, value in record.items():
                    if name != "step" and isinstance(value, (int, float)):
                        self._events.add_scalar(name, value, record["step"])
            if "loss" in record:
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self, amount: int = 1) -> None:
        """Moves the progress bar by `amount` steps (or tokens)."""
        self._bar.update(amount)

    def flush(self) -> None:
        """Makes every record logged so far readable in metrics.jsonl and the event files
        (uploads them whole in object storage; local files have them already)."""
        if self.enabled and self._lines is not None:
            try:
                write_text_atomically(self.path, "".join(self._lines))
                if self._local_events is not None:
                    if self._events is not None:
                        self._events.flush()
                    storage.upload_tree(self._local_events, self._events_dir)
            except Exception as err:  # noqa: BLE001 - fsspec clients raise anything
                raise storage.StorageError(
                    f"{self.path}: the metrics could not be written "
                    f"({first_line(err, innermost=True)}); the records up to the last "
                    f"checkpoint are in the previous upload: rerun the same command once the "
                    f"storage answers") from err
            self._uploaded = time.monotonic()

    def close(self, *, failed: bool = False) -> None:
        """Writes the records and events out and closes the progress bar. `failed`: the run
        is stopping on an error already; a write that fails now is reported as a warning, so
        that error stays the one the user sees."""
        if self._events is not None:
            self._events.close()
            self._events = None
        try:
            self.flush()
        except storage.StorageError as err:
            if not failed:
                raise
            warnings.warn(str(err), stacklevel=2)
        if self._local_events is not None:
            shutil.rmtree(self._local_events, ignore_errors=True)
        self._bar.close()


def read_metrics_file(path: PathLike) -> tuple[list[dict[str, Any]], int]:
    """Parses a metrics.jsonl file, tolerating damage.

    Returns (records, skipped): records in file order, each a JSON object with a numeric "step";
    skipped counts the non-blank lines that are not (a truncated last line from a killed
    process, or any other garbage). Raises FileNotFoundError when `path` does not exist.
    """
    records, skipped = [], 0
    for line in storage.path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def read_metrics(member_dir: PathLike) -> list[dict[str, Any]]:
    """The records of MEMBER_DIR/metrics.jsonl (none when it does not exist), damaged lines
    left out."""
    path = storage.path(member_dir) / METRICS_FILE
    return read_metrics_file(path)[0] if path.is_file() else []


# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind.
PEAK_FLOPS = {
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
    "TPU v6": 918e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU)."""
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None
