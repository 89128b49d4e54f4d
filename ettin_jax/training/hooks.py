"""The train loop's hooks: "every N steps, do X", and the ones every run uses.

    hooks = StepHooks()
    hooks.every(100, evaluate_heldout(evaluate), waits=True)     # steps 100, 200, ... and last
    hooks.every(10, log_metrics(log, ...), also=lambda info: bool(info.extra), waits=True)
    hooks.every(500, save_checkpoint(checkpoints, ...), also=lambda info: info.stopped,
                waits=True)
    hooks.every(1, advance_progress(log, by_tokens=True))
    ...
    hooks.run(info)                                              # after each step

A hook is a function of one `StepInfo`: the step just finished. Hooks run in the order they were
added, on every process (evaluation and checkpoints are collectives; only process 0 writes
metrics), after every N-th step of the run, after the last step of each phase, and after any
step for which their `also` condition holds.

The host does not wait for the device between steps: a step's metrics stay on the device until
the run looks at them (`StepInfo.metrics` is None on other steps). Hooks that read device values
(metrics, parameters, the state for a checkpoint) are added with `waits=True`: they run with
device transfers allowed (`jax.transfer_guard("allow")`), and a step where one is due is a step
where the train loop looks at the metrics first. Every other hook runs under whatever transfer
guard the user set, so `JAX_TRANSFER_GUARD=disallow` finds a hook that stalls the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from ettin_jax.training.checkpoint import TrainCheckpointer
from ettin_jax.training.distributed import merged_across_processes
from ettin_jax.training.metrics import MetricsLog
from ettin_jax.training.state import TrainState


@dataclasses.dataclass
class StepInfo:
    """A finished step as the hooks see it.

    step / phase_step: updates done in the run / in this phase, this one included; tokens /
    phase_tokens: real tokens seen likewise (counted on the host, `batches.PreparedBatch`);
    state: the state after the step (device arrays, possibly still being computed); metrics:
    the step's metrics as host numbers (`make_train_step`) when the loop looked at them this
    step, else None; batch_rows / batch_tokens: rows and real tokens of its batch; seconds /
    interval_steps / interval_tokens: wall time, steps and real tokens since the loop last
    looked at the metrics (throughput is measured over that interval: the device runs ahead of
    the host in between); data_state: the data iterator's state just after its batch; last:
    the phase ends with this step; stopped: why the run stops after it (preemption,
    divergence), or None; failed: the stop is a training failure. Hooks may put values in
    `extra` for the hooks after them (held-out metrics for the metrics record).
    """

    step: int
    phase_step: int
    tokens: int
    phase_tokens: int
    state: TrainState
    metrics: dict[str, Any] | None
    batch_rows: int
    batch_tokens: int
    seconds: float
    interval_steps: int
    interval_tokens: int
    data_state: dict
    last: bool
    stopped: str | None = None
    failed: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


Hook = Callable[[StepInfo], None]


@dataclasses.dataclass(frozen=True)
class _Entry:
    steps: int | None
    hook: Hook
    also: Callable[[StepInfo], Any] | None
    waits: bool

    def due(self, info: StepInfo) -> bool:
        return bool((self.steps and info.step % self.steps == 0) or info.last
                    or (self.also and self.also(info)))


class StepHooks:
    """The hooks of one phase, in the order they run."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def every(self, steps: int | None, hook: Hook, *,
              also: Callable[[StepInfo], Any] | None = None, waits: bool = False) -> None:
        """Runs hook(info) after every `steps`-th step of the run (0 or None: no cadence),
        after the last step of the phase, and after any step where `also(info)` is true.
        `waits`: the hook reads device values (see the module docstring)."""
        self._entries.append(_Entry(steps, hook, also, waits))

    def waits_after(self, info: StepInfo) -> bool:
        """Whether a hook that reads device values is due after this step by its cadence (the
        loop then looks at the metrics before running the hooks). `also` conditions that
        depend on what earlier hooks put in `info.extra` are not foreseen."""
        return any(entry.waits and entry.due(info) for entry in self._entries)

    def run(self, info: StepInfo) -> None:
        """Runs the hooks that are due after the step `info` describes."""
        for entry in self._entries:
            if entry.due(info):
                if entry.waits:
                    with jax.transfer_guard("allow"):
                        entry.hook(info)
                else:
                    entry.hook(info)


def evaluate_heldout(evaluate: Callable[[Any], dict[str, float]]) -> Hook:
    """Held-out loss, perplexity and accuracy of the step's parameters, into `info.extra`.
    Add with waits=True."""
    def hook(info: StepInfo) -> None:
        info.extra.update(evaluate(info.state.params))

    return hook


def log_metrics(log: MetricsLog, *, phase: str, flops_per_token: float,
                peak_flops: float | None, devices: int) -> Hook:
    """One metrics record of the step (metrics.jsonl and TensorBoard, on process 0): loss,
    accuracy, learning rate, grad norm, token counts, batch rows, tokens/s, mean step time,
    FLOP/s and MFU (when the accelerator's peak is known) since the previous look at the
    metrics, skipped updates, and what earlier hooks put in `info.extra`. Add with
    waits=True."""
    def hook(info: StepInfo) -> None:
        metrics = info.metrics
        if metrics is None:
            raise RuntimeError(f"log_metrics ran after step {info.step} without its metrics: "
                               f"add it with waits=True")
        tokens_per_s = info.interval_tokens / info.seconds
        record = {"step": info.step, "phase": phase, "loss": float(metrics["loss"]),
                  "accuracy": float(metrics["accuracy"]),
                  "learning_rate": float(metrics["learning_rate"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens": info.tokens,
                  "phase_tokens": info.phase_tokens, "batch_rows": info.batch_rows,
                  "tokens_per_s": tokens_per_s,
                  "step_time_s": info.seconds / info.interval_steps,
                  "flops_per_s": flops_per_token * tokens_per_s,
                  "skipped": int(metrics["skipped"])}
        if peak_flops is not None:
            record["mfu"] = record["flops_per_s"] / (peak_flops * devices)
        record.update(info.extra)
        log.log(record)

    return hook


def advance_progress(log: MetricsLog, *, by_tokens: bool) -> Hook:
    """Moves the progress bar by one step, or by the step's real tokens (host values only)."""
    def hook(info: StepInfo) -> None:
        log.advance(info.batch_tokens if by_tokens else 1)

    return hook


def save_checkpoint(checkpoints: TrainCheckpointer, *, phase_index: int, phase: str,
                    meta: dict, recipe: dict) -> Hook:
    """Starts writing the step's checkpoint (state, every process's data state, where the run
    stands, the recipe); a phase's last step is also marked as its end (kept forever). Add
    with waits=True."""
    def hook(info: StepInfo) -> None:
        progress = {"phase": phase_index, "phase_name": phase, "phase_step": info.phase_step,
                    "phase_tokens": info.phase_tokens, "tokens": info.tokens,
                    "data": merged_across_processes(info.data_state)}
        checkpoints.save(info.step, info.state, meta=meta, recipe=recipe, progress=progress)
        if info.last and not info.stopped:
            checkpoints.mark_phase_end(info.step, phase)

    return hook
