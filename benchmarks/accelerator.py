"""The accelerator tables in one run (`make bench`): attention forward + backward per
implementation, and the train step's tokens/s and MFU of ettin-150m and ettin-1b.

    .venv/bin/python benchmarks/accelerator.py            # print the tables, write the JSON
    .venv/bin/python benchmarks/accelerator.py --write    # and replace docs/benchmarks.md's
                                                          # "Accelerator (make bench)" section

Attention: `ettin_jax.models.attention.dot_product_attention` for every implementation in
`IMPLEMENTATIONS` that applies to the platform (others: n/a), H = 12 heads x D = 64 (Ettin-150m),
bf16, S = 1024 and 8192 (16,384 tokens per call), masks global, causal, local (window 128) and
packed (several documents per row); forward + backward time and TFLOP/s of the visible
(query, key) pairs (`benchmarks/attention.py`'s count).

Train step: the project's jitted `sharded_train_step` on one device (`init_state`,
`make_optimizer` with the recipe's optimizer), both members, phase 1 and phase 2 of
recipes/ettin-150m.yaml and recipes/ettin-1b.yaml (seq_len, mask ratio, bf16 autocast numerics
as the recipe's phases set them) with `attention_impl: auto`; random one-document rows, as many
per step as ROWS says; MFU = tokens/s x `training_flops_per_token` / `peak_flops(device_kind)`.

Budget: the whole run stays under 8 minutes. The train steps compile in background threads while
attention is measured; each measurement has a time limit (--limit-s: the compile wait and the
timed steps) and anything that would start after --budget-s is reported as skipped.

Without an accelerator the script says so on stderr and runs the same code paths on a tiny CPU
plan (tiny preset, S 128, 2 timed steps); `tests/test_benchmarks.py` runs that.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention import CASES, HEAD_DIM, HEADS, _fwd_bwd, _segments  # noqa: E402
from ettin_jax.config import load_recipe  # noqa: E402
from ettin_jax.config.schema import MeshConfig  # noqa: E402
from ettin_jax.models import attention as model_attention  # noqa: E402
from ettin_jax.models.describe import training_flops_per_token  # noqa: E402
from ettin_jax.training.mesh import batch_sharding, make_mesh  # noqa: E402
from ettin_jax.training.metrics import peak_flops  # noqa: E402
from ettin_jax.training.optimizer import make_optimizer  # noqa: E402
from ettin_jax.training.phases import phase_named  # noqa: E402
from ettin_jax.training.state import abstract_state, init_state, init_state_shardings  # noqa: E402
from pallas_kernels.flash_attention import visibility_mask  # noqa: E402
from train_step import (  # noqa: E402
    build_step,
    call_step,
    median_seconds,
    random_batch,
    takes_learning_rate,
)

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Accelerator (`make bench`)"
MEMBERS = (("encoder", "mlm"), ("decoder", "clm"))
PHASES = ("pretrain", "extension")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures. models: (label, recipe path, {phase name: rows per step});
    seq: every phase's sequence length instead of the recipe's (None: the recipe's)."""

    attention_seqs: tuple[int, ...]
    attention_tokens: int
    attention_repeats: int
    models: tuple[tuple[str, Path, dict[str, int]], ...]
    seq: int | None
    steps: int
    warmup: int
    limit_s: float
    budget_s: float


# Rows per step on one chip: comfortably inside 80 GB (H100) and 95 GB (v5p) with fp32 master
# weights and Adam moments on that chip (1b: ~19 GB of state); a step that does not fit is
# retried once with half the rows.
ACCELERATOR = Plan(
    attention_seqs=(1024, 8192), attention_tokens=16_384, attention_repeats=10,
    models=(("ettin-150m", ROOT / "recipes" / "ettin-150m.yaml", {"pretrain": 16, "extension": 2}),
            ("ettin-1b", ROOT / "recipes" / "ettin-1b.yaml", {"pretrain": 4, "extension": 1})),
    seq=None, steps=10, warmup=2, limit_s=100.0, budget_s=440.0)
CPU = Plan(
    attention_seqs=(128,), attention_tokens=256, attention_repeats=2,
    models=(("tiny", ROOT / "recipes" / "tiny.yaml", {"pretrain": 2, "extension": 2}),),
    seq=128, steps=2, warmup=1, limit_s=600.0, budget_s=1200.0)  # no 8-minute rule here


def has_accelerator() -> bool:
    """Whether JAX's default backend is a GPU or TPU."""
    return jax.default_backend() in ("gpu", "tpu")


def applies(impl: str, backend: str) -> bool:
    """Whether attention implementation `impl` runs (compiled, not interpreted) on `backend`:
    cudnn only on a CUDA GPU, splash only on a TPU, the Pallas kernels on a GPU or TPU."""
    if impl == "cudnn":
        return backend == "gpu"
    if impl == "splash":
        return backend == "tpu"
    if impl == "pallas":
        return backend in ("gpu", "tpu")
    return True


def train_attention_impl(backend: str) -> str:
    """"auto" when the model has it; before that, what it would pick: the Pallas kernels on
    an accelerator, XLA on a CPU."""
    if "auto" in model_attention.IMPLEMENTATIONS:
        return "auto"
    return "pallas" if backend in ("gpu", "tpu") else "xla"


class _Deadline:
    """Seconds left of the run's budget."""

    def __init__(self, budget_s: float):
        self.end = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


class _Background:
    """fn() in a daemon thread (XLA compiles there without holding the GIL); result(timeout)
    re-raises its error, or TimeoutError when it has not finished."""

    def __init__(self, fn: Callable[[], Any], gate: threading.Semaphore):
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.seconds = math.nan

        def run() -> None:
            with gate:
                start = time.perf_counter()
                try:
                    self._value = fn()
                except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                    self._error = err
                self.seconds = time.perf_counter() - start
                self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float) -> Any:
        if not self._done.wait(max(0.0, timeout)):
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


def _provenance() -> dict[str, str]:
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__}


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"error: {type(err).__name__}: {text[0][:160] if text else ''}"


def measure_attention(plan: Plan, deadline: _Deadline) -> list[dict[str, Any]]:
    """One row per (seq, mask, implementation): forward + backward ms and TFLOP/s of the
    visible pairs, or a status (n/a, skipped, error)."""
    backend = jax.default_backend()
    dtype = jnp.bfloat16
    rng = np.random.default_rng(0)
    rows = []
    for seq in plan.attention_seqs:
        batch = max(1, plan.attention_tokens // seq)
        q, k, v, cotangent = (jnp.asarray(rng.normal(size=(batch, seq, HEADS, HEAD_DIM)), dtype)
                              for _ in range(4))
        for name, (causal, window, packed) in CASES.items():
            segments = jnp.asarray(_segments(rng, batch, seq, packed))
            pairs = float(jnp.sum(visibility_mask(segments, causal=causal, window=window)))
            flops = 3.5 * 4 * pairs * HEAD_DIM * HEADS
            for impl in model_attention.IMPLEMENTATIONS:
                row = {"table": "attention", **_provenance(), "seq": seq, "batch": batch,
                       "mask": name, "impl": impl, "ms": None, "tflops": None}
                if not applies(impl, backend):
                    rows.append({**row, "status": f"n/a on {backend}"})
                    continue
                if deadline.left() < 5:
                    rows.append({**row, "status": "skipped: time budget"})
                    continue
                attend = _attention_fn(segments, causal, window, impl)
                try:
                    fn = _fwd_bwd(attend)

                    def call(fn=fn):
                        jax.block_until_ready(fn(q, k, v, cotangent))

                    seconds, _ = median_seconds(
                        call, plan.attention_repeats, warmup=1,
                        limit_s=min(plan.limit_s, deadline.left()) / 4)
                except Exception as err:  # noqa: BLE001 - one row's failure, reported
                    rows.append({**row, "status": _error(err)})
                    continue
                rows.append({**row, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                             "status": "ok"})
                print(_attention_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _attention_fn(segments, causal, window, impl):
    def attend(q, k, v):
        return model_attention.dot_product_attention(q, k, v, segments, causal=causal,
                                                     window=window, impl=impl)
    return attend


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """One train-step measurement: model, member, phase, the phase's model config (with the
    attention implementation set), seq, rows, mask ratio, optimizer config."""

    model: str
    member: str
    objective: str
    phase: str
    config: Any
    seq: int
    rows: int
    mask_ratio: float
    optimizer: Any


def train_cases(plan: Plan, impl: str) -> list[TrainCase]:
    """The train-step measurements of `plan`, in the order they run."""
    cases = []
    for label, path, rows in plan.models:
        recipe = load_recipe(path)
        for phase_name in PHASES:
            for member, objective in MEMBERS:
                phase = phase_named(recipe.for_member(member), phase_name)
                config = dataclasses.replace(phase.model, attention_impl=impl)
                cases.append(TrainCase(label, member, objective, phase_name, config,
                                       plan.seq or phase.train.seq_len, rows[phase_name],
                                       phase.data.mlm_mask_ratio, phase.optimizer))
    return cases


def _compiled_step(case: TrainCase, rows: int, mesh) -> Callable[[], Any]:
    """Traces the step here (tracing is not thread-safe) and returns the compile to run in
    the background: () -> (compiled step, shardings)."""
    optimizer = make_optimizer(case.optimizer)
    shardings = init_state_shardings(case.config, case.objective, optimizer, mesh)
    step = build_step(case.config, case.objective, optimizer, shardings, mesh, seed=0,
                      mlm_mask_ratio=case.mask_ratio)
    args = [abstract_state(shardings, case.config, case.objective, optimizer),
            {key: jax.ShapeDtypeStruct((rows, case.seq), jnp.int32, sharding=batch_sharding(mesh))
             for key in ("input_ids", "segment_ids", "positions", "labels")}]
    if takes_learning_rate(step):
        args.append(jax.ShapeDtypeStruct((), jnp.float32))
    lowered = step.lower(*args)
    return lambda: lowered.compile()


def measure_train(plan: Plan, cases: list[TrainCase], deadline: _Deadline,
                  compiles: dict[int, _Background], mesh, gate) -> list[dict[str, Any]]:
    """One row per case: step ms, tokens/s, MFU (None without a known peak), compile s, or a
    status. A case that runs out of memory is retried once with half its rows."""
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    rows = []
    for index, case in enumerate(cases):
        row = {"table": "train", **_provenance(), "model": case.model, "member": case.member,
               "phase": case.phase, "seq": case.seq, "rows": case.rows,
               "attention_impl": case.config.attention_impl, "step_ms": None,
               "tokens_per_s": None, "mfu": None, "compile_s": None, "timed_steps": 0}
        compile_job = compiles.get(index)
        for attempt in range(2):
            if deadline.left() < 10 or compile_job is None:
                row["status"] = "skipped: time budget"
                break
            try:
                compiled = compile_job.result(min(plan.limit_s, deadline.left()))
                row["compile_s"] = compile_job.seconds
                row.update(_time_train(plan, case, row["rows"], compiled, mesh, deadline, peak))
                row["status"] = "ok"
                break
            except TimeoutError:
                row["status"] = f"timed out: compile > {min(plan.limit_s, deadline.left()):.0f} s"
                break
            except Exception as err:  # noqa: BLE001 - reported in the row
                row["status"] = _error(err)
                if attempt or "RESOURCE_EXHAUSTED" not in str(err) or row["rows"] == 1:
                    break
                row["rows"] //= 2
                compile_job = _Background(_compiled_step(case, row["rows"], mesh), gate)
        rows.append(row)
        print(_train_line(row), file=sys.stderr, flush=True)
    return rows


def _time_train(plan: Plan, case: TrainCase, rows: int, compiled, mesh, deadline: _Deadline,
                peak: float | None) -> dict[str, Any]:
    optimizer = make_optimizer(case.optimizer)
    state, _ = init_state(case.config, case.objective, optimizer, mesh, seed=0)
    batch = jax.device_put(random_batch(case.config.vocab_size, rows, case.seq,
                                        objective=case.objective, mask_ratio=case.mask_ratio),
                           batch_sharding(mesh))
    holder = [state]

    def step():
        holder[0], metrics = call_step(compiled, holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    try:
        seconds, timed = median_seconds(step, plan.steps, warmup=plan.warmup,
                                        limit_s=max(1.0, min(plan.limit_s / 4, deadline.left())))
    finally:
        del holder[0], state
    tokens_per_s = rows * case.seq / seconds
    flops = training_flops_per_token(case.config, case.objective, seq_len=case.seq,
                                     mlm_mask_ratio=case.mask_ratio)["total"]
    return {"step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s, "timed_steps": timed,
            "mfu": None if peak is None else tokens_per_s * flops / peak,
            "flops_per_token": flops}


def run(plan: Plan) -> dict[str, Any]:
    """Measures `plan` on the default device; returns {"provenance", "attention", "train"}."""
    deadline = _Deadline(plan.budget_s)
    backend = jax.default_backend()
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    cases = train_cases(plan, train_attention_impl(backend))
    gate = threading.Semaphore(max(1, min(4, (os.cpu_count() or 2) // 4)))
    compiles = {}
    for index, case in enumerate(cases):
        try:
            compiles[index] = _Background(_compiled_step(case, case.rows, mesh), gate)
        except Exception as err:  # noqa: BLE001 - a tracing error: reported in the row
            compiles[index] = _Failed(err)
    attention = measure_attention(plan, deadline)
    train = measure_train(plan, cases, deadline, compiles, mesh, gate)
    return {"provenance": provenance(plan), "attention": attention, "train": train,
            "pending_compiles": sum(not job.done() for job in compiles.values())}


class _Failed:
    """A compile job that failed before it started."""

    seconds = math.nan

    def __init__(self, error: BaseException):
        self._error = error

    def done(self) -> bool:
        return True

    def result(self, timeout: float) -> Any:
        raise self._error


def provenance(plan: Plan) -> dict[str, Any]:
    """Date, command, machine, device, JAX version and whether an accelerator ran."""
    return {"date": datetime.date.today().isoformat(),
            "command": " ".join(["python", *[Path(a).name if a.endswith(".py") else a
                                             for a in sys.argv]]),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores, Python "
                       f"{platform.python_version()}",
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "accelerator": has_accelerator(), "budget_s": plan.budget_s,
            "limit_s": plan.limit_s}


def _fmt(value: float | None, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _attention_line(row: dict[str, Any]) -> str:
    ok = row["status"] == "ok"
    return (f"| {row['device']} | {row['jax']} | {row['seq']} | {row['batch']} | {row['mask']} | "
            f"{row['impl']} | {_fmt(row['ms'], '.3f') if ok else row['status']} | "
            f"{_fmt(row['tflops'], '.3g') if ok else ''} |")


def _train_line(row: dict[str, Any]) -> str:
    ok = row["status"] == "ok"
    mfu = (_fmt(row["mfu"], ".1%", "n/a (peak unknown)")) if ok else ""
    return (f"| {row['device']} | {row['jax']} | {row['model']} | {row['member']} | "
            f"{row['phase']} | {row['seq']} | {row['rows']} | {row['attention_impl']} | "
            f"{_fmt(row['step_ms'], ',.1f') if ok else row['status']} | "
            f"{_fmt(row['tokens_per_s'], ',.0f') if ok else ''} | {mfu} | "
            f"{_fmt(row['compile_s'], '.0f')} |")


def markdown(results: dict[str, Any]) -> str:
    """The two tables (attention, train step), one row per measurement."""
    lines = ["Attention forward + backward (bf16, 12 heads x 64; TFLOP/s of the visible "
             "(query, key) pairs):", "",
             "| device | JAX | seq | batch | mask | implementation | fwd+bwd ms | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_attention_line(row) for row in results["attention"]]
    lines += ["", "Train step (one chip; the recipe's numerics; random one-document rows; "
              "median step of the timed steps):", "",
              "| device | JAX | model | member | phase | seq | rows per step | attention | "
              "step ms | tokens/s | MFU | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_train_line(row) for row in results["train"]]
    return "\n".join(lines) + "\n"


def section(results: dict[str, Any]) -> str:
    """docs/benchmarks.md's accelerator section around the tables of `results`."""
    prov = results["provenance"]
    head = [SECTION, "",
            "Command: `make bench` (= `.venv/bin/python benchmarks/accelerator.py --write`, which "
            "replaces this section; without `--write` it prints the tables and writes "
            "`runs/bench/accelerator.json`). On a GPU or TPU it takes under 8 minutes: attention "
            "forward + backward of every implementation in "
            "`ettin_jax.models.attention.IMPLEMENTATIONS` that applies to the platform (S 1024 "
            "and 8192, 16,384 tokens per call; global, causal, local window 128, packed "
            "segments), then the train step of ettin-150m and ettin-1b, encoder and decoder, at "
            "phase 1 (seq 1024) and phase 2 (seq 7999) of their recipes (bf16 autocast, "
            "`attention_impl: auto`) on one chip: 16 and 2 rows per step for ettin-150m, 4 and "
            "1 for ettin-1b. MFU uses `training_flops_per_token` and `peak_flops(device_kind)`. "
            "Each measurement has a time limit; what the budget leaves out is marked skipped. "
            "On a GPU, install JAX's CUDA plugin into `.venv` first (`jax[cuda12]` or "
            "`jax[cuda13]` at the installed JAX version; `make install` brings the TPU one).",
            ""]
    if not prov["accelerator"]:
        head += ["**Not yet measured: no accelerator has been lent.** Without one the script "
                 "says so and runs the same code paths on a tiny CPU plan (tiny preset, S 128, "
                 "2 timed steps); its output below is an example of the tables only, not a "
                 "figure to compare.", ""]
    head += [f"{prov['date']}, {prov['machine']}, JAX {prov['jax']}, {prov['devices']} x "
             f"{prov['device']}; command `{prov['command']}`.", ""]
    return "\n".join(head) + "\n" + markdown(results)


def write_section(text: str, path: Path = DOCS) -> None:
    """Replaces the accelerator section of `path` (from its heading to the next "## ") with
    `text`, or appends it when there is none."""
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == SECTION]
    if not starts:
        path.write_text("".join(lines).rstrip("\n") + "\n\n" + text)
        return
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + tail if tail else ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the accelerator plan (or the CPU one without an accelerator), prints the tables,
    writes the JSON and, with --write, the docs section. Returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="replace the accelerator section of docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "accelerator.json")
    parser.add_argument("--limit-s", type=float, help="time limit of one measurement")
    parser.add_argument("--budget-s", type=float, help="time for all measurements")
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = ACCELERATOR if has_accelerator() else CPU
    if not has_accelerator():
        print(f"no accelerator: JAX runs on {jax.default_backend()!r}; running the tiny CPU "
              f"version of the same code paths (an example of the tables, not a measurement "
              f"to compare)", file=sys.stderr)
    plan = dataclasses.replace(plan, limit_s=args.limit_s or plan.limit_s,
                               budget_s=args.budget_s or plan.budget_s)
    results = run(plan)
    print(markdown(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.write:
        write_section(section(results), args.docs)
        print(f"replaced the accelerator section of {args.docs}", file=sys.stderr)
    return results


if __name__ == "__main__":
    outcome = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if outcome["pending_compiles"]:  # compiles still running in daemon threads: do not wait
        os._exit(0)
