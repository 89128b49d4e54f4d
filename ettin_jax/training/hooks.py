"""The train loop's hooks: "every N steps, do X", and the ones every run uses.

    hooks = StepHooks()
    hooks.every(100, evaluate_heldout(evaluate))                 # steps 100, 200, ... and last
    hooks.every(10, log_metrics(log, ...), also=lambda info: bool(info.extra))
    hooks.every(500, save_checkpoint(checkpoints, ...), also=lambda info: info.stopped)
    ...
    hooks.run(info)                                              # after each step

A hook is a function of one `StepInfo`: the step just finished. Hooks run in the order they were
added, on every process (evaluation and checkpoints are collectives; only process 0 writes
metrics), after every N-th step of the run, after the last step of each phase, and after any
step for which their `also` condition holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ettin_jax.training.checkpoint import TrainCheckpointer
from ettin_jax.training.distributed import merged_across_processes
from ettin_jax.training.metrics import MetricsLog
from ettin_jax.training.state import TrainState


@dataclasses.dataclass
class StepInfo:
    """A finished step as the hooks see it.

    step / phase_step: updates done in the run / in this phase, this one included; tokens /
    phase_tokens: real tokens seen likewise; state: the state after the step; metrics: the
    step's metrics as host numbers (`make_train_step`); batch_rows: rows in its batch;
    seconds: wall time since the previous step; data_state: the data iterator's state just
    after its batch; last: the phase ends with this step; stopped: why the run stops after it
    (preemption, divergence), or None; failed: the stop is a training failure. Hooks may put
    values in `extra` for the hooks after them (held-out metrics for the metrics record).
    """

    step: int
    phase_step: int
    tokens: int
    phase_tokens: int
    state: TrainState
    metrics: dict[str, Any]
    batch_rows: int
    seconds: float
    data_state: dict
    last: bool
    stopped: str | None = None
    failed: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


Hook = Callable[[StepInfo], None]


class StepHooks:
    """The hooks of one phase, in the order they run."""

    def __init__(self) -> None:
        self._hooks: list[tuple[int | None, Hook, Callable[[StepInfo], Any] | None]] = []

    def every(self, steps: int | None, hook: Hook, *,
              also: Callable[[StepInfo], Any] | None = None) -> None:
        """Runs hook(info) after every `steps`-th step of the run (0 or None: no cadence),
        after the last step of the phase, and after any step where `also(info)` is true."""
        self._hooks.append((steps, hook, also))

    def run(self, info: StepInfo) -> None:
        """Runs the hooks that are due after the step `info` describes."""
        for steps, hook, also in self._hooks:
            if (steps and info.step % steps == 0) or info.last or (also and also(info)):
                hook(info)


def evaluate_heldout(evaluate: Callable[[Any], dict[str, float]]) -> Hook:
    """Held-out loss, perplexity and accuracy of the step's parameters, into `info.extra`."""
    def hook(info: StepInfo) -> None:
        info.extra.update(evaluate(info.state.params))

    return hook


def log_metrics(log: MetricsLog, *, phase: str, flops_per_token: float,
                peak_flops: float | None, devices: int) -> Hook:
    """One metrics record of the step (metrics.jsonl and TensorBoard, on process 0): loss,
    accuracy, learning rate, grad norm, token counts, batch rows, this step's tokens/s, step
    time, FLOP/s and MFU (when the accelerator's peak is known), skipped updates, and what
    earlier hooks put in `info.extra`."""
    def hook(info: StepInfo) -> None:
        metrics, real = info.metrics, int(info.metrics["real_tokens"])
        record = {"step": info.step, "phase": phase, "loss": float(metrics["loss"]),
                  "accuracy": float(metrics["accuracy"]),
                  "learning_rate": float(metrics["learning_rate"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens": info.tokens,
                  "phase_tokens": info.phase_tokens, "batch_rows": info.batch_rows,
                  "tokens_per_s": real / info.seconds, "step_time_s": info.seconds,
                  "flops_per_s": flops_per_token * real / info.seconds,
                  "skipped": int(metrics["skipped"])}
        if peak_flops is not None:
            record["mfu"] = record["flops_per_s"] / (peak_flops * devices)
        record.update(info.extra)
        log.log(record)

    return hook


def advance_progress(log: MetricsLog, *, by_tokens: bool) -> Hook:
    """Moves the progress bar by one step, or by the step's real tokens."""
    def hook(info: StepInfo) -> None:
        log.advance(int(info.metrics["real_tokens"]) if by_tokens else 1)

    return hook


def save_checkpoint(checkpoints: TrainCheckpointer, *, phase_index: int, phase: str,
                    meta: dict, recipe: dict) -> Hook:
    """Starts writing the step's checkpoint (state, every process's data state, where the run
    stands, the recipe); a phase's last step is also marked as its end (kept forever)."""
    def hook(info: StepInfo) -> None:
        progress = {"phase": phase_index, "phase_name": phase, "phase_step": info.phase_step,
                    "phase_tokens": info.phase_tokens, "tokens": info.tokens,
                    "data": merged_across_processes(info.data_state)}
        checkpoints.save(info.step, info.state, meta=meta, recipe=recipe, progress=progress)
        if info.last and not info.stopped:
            checkpoints.mark_phase_end(info.step, phase)

    return hook
