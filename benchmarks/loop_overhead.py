"""The train loop's tokens/s against the bare jitted step on the same batches: what the loop
(data, host syncs, hooks, logging) costs on top of the step.

    .venv/bin/python benchmarks/loop_overhead.py [--presets tiny ettin-17m] [--steps 30]

Loop: `ettin_jax.training.trainer.train_pair` on the first phase of recipes/tiny.yaml (its data:
`make demo-data`), model.preset set to each preset, a constant batch (no batch-size warmup),
train.steps = warm-up + --steps + 5, a metrics record every 5 steps, evaluation and a
checkpoint only after the last step. Its wall time is read while it runs: a thread watches the
encoder's metrics.jsonl and notes when the records of step --warmup and step --warmup + --steps
appear; tokens are the difference of the records' `tokens`. The last steps (evaluation,
checkpoint) fall outside the window.

Bare step: the same `sharded_train_step` (same model, optimizer, mesh, mask ratio and
microbatches) called in a Python loop on batches built beforehand from the same data stream
(`make_batch_iterator` with the phase's seeds) and placed on the devices, blocking only after
the last step; tokens/s = real tokens of the timed batches / wall time.

Prints one Markdown row per preset (loop tokens/s, step tokens/s, loop / step) for
docs/benchmarks.md. The encoder (MLM) member only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

from data_pipelines.pipeline import load_data_tokenizer, make_batch_iterator
from ettin_jax.config import load_recipe, override_recipe
from ettin_jax.training.batch_sizing import phase_batch_sizes, phase_data_seed, sized_recipe
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import init_state
from ettin_jax.training.trainer import train_pair
from provenance import print_provenance
from train_step import build_step, call_step

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"
LOG_EVERY = 5


def bench_recipe(path: Path, preset: str, steps: int, warmup: int):
    """The first phase of the recipe at `path` as a one-phase recipe for a short run of
    `preset`: warmup + steps + LOG_EVERY steps at a constant batch, records every LOG_EVERY
    steps, evaluation and a checkpoint only after the last step."""
    # The preset is set on the file's own sections: a loaded recipe has its shape fields
    # spelled out, which a later model.preset override would not change.
    recipe = load_recipe(path, [f"model.preset={preset}"])
    recipe = recipe.phase_recipe(recipe.run_phases()[0])
    total = warmup + steps + LOG_EVERY
    return override_recipe(recipe, [
        "train.tokens=null", f"train.steps={total}",
        "train.batch_warmup_tokens=0", f"logging.every_steps={LOG_EVERY}",
        f"logging.eval_every_steps={total}", f"checkpoint.every_steps={total}",
    ], source=f"{path} (benchmark overrides)")


class _RecordWatch:
    """Notes the wall time at which each step's record appears in a metrics.jsonl."""

    def __init__(self, path: Path, steps: set[int]):
        self.seen: dict[int, tuple[float, dict]] = {}
        self._path, self._steps = path, steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and len(self.seen) < len(self._steps):
            now = time.perf_counter()
            if self._path.is_file():
                for line in self._path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line being written
                        continue
                    if record.get("step") in self._steps and record["step"] not in self.seen:
                        self.seen[record["step"]] = (now, record)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def loop_tokens_per_s(recipe, run_dir: Path, warmup: int, steps: int) -> dict:
    """Trains the encoder with `train_pair` and returns tokens, seconds and tokens/s between
    the records of steps `warmup` and `warmup + steps`."""
    first, last = warmup, warmup + steps
    watch = _RecordWatch(run_dir / "encoder" / "metrics.jsonl", {first, last})
    try:
        result = train_pair(recipe, run_dir, only="encoder")["encoder"]
    finally:
        watch.stop()
    if result.stopped or {first, last} - set(watch.seen):
        raise RuntimeError(f"the run did not log steps {first} and {last}: {result}")
    (t0, r0), (t1, r1) = watch.seen[first], watch.seen[last]
    tokens = r1["tokens"] - r0["tokens"]
    return {"tokens": tokens, "seconds": t1 - t0, "tokens_per_s": tokens / (t1 - t0),
            "final_step": result.step}


def step_tokens_per_s(recipe, warmup: int, steps: int) -> dict:
    """The bare jitted step of the recipe's (sized) phase on `warmup + steps` prebuilt device
    batches of its data; tokens/s over the last `steps`."""
    tokenizer = load_data_tokenizer(recipe.data)
    mesh = make_mesh(recipe.mesh)
    recipe = sized_recipe(recipe, phase_batch_sizes(recipe, tokenizer=tokenizer,
                                                    row_multiple=mesh.size))
    train = recipe.train
    optimizer = make_optimizer(recipe.optimizer)
    state, shardings = init_state(recipe.model, "mlm", optimizer, mesh, seed=train.seed)
    step_fn = build_step(recipe.model, "mlm", optimizer, shardings, mesh, seed=train.seed,
                         mlm_mask_ratio=recipe.data.mlm_mask_ratio,
                         microbatch_size=train.microbatch_size)
    stream = make_batch_iterator(recipe.data, seq_len=train.seq_len,
                                 global_batch_size=train.global_batch_size, seed=train.seed,
                                 data_seed=phase_data_seed(train, 0), objective="mlm",
                                 tokenizer=tokenizer)
    batches = [{k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
                for k, v in next(stream).items()} for _ in range(warmup + steps)]
    for batch in batches[:warmup]:
        state, metrics = call_step(step_fn, state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        state, metrics = call_step(step_fn, state, batch)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    tokens = sum(int((batch["segment_ids"] != 0).sum()) for batch in batches[warmup:])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "rows": train.global_batch_size, "seq": train.seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ettin-17m"])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (multiple of 5)")
    parser.add_argument("--warmup", type=int, default=LOG_EVERY,
                        help="steps before timing (multiple of 5)")
    parser.add_argument("--label", default="before", help="the row's label (before / after)")
    args = parser.parse_args()
    if args.steps % LOG_EVERY or args.warmup % LOG_EVERY or args.warmup < 1:
        sys.exit(f"--steps and --warmup must be positive multiples of {LOG_EVERY}")
    print_provenance(f"recipe {args.recipe.name} (first phase), {args.steps} timed steps after "
                     f"{args.warmup}, encoder")
    print("| loop | preset | rows x seq | loop tokens/s | bare step tokens/s | loop / step |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        recipe = bench_recipe(args.recipe, preset, args.steps, args.warmup)
        with tempfile.TemporaryDirectory() as run_dir:
            loop = loop_tokens_per_s(recipe, Path(run_dir), args.warmup, args.steps)
        bare = step_tokens_per_s(recipe, args.warmup, args.steps)
        print(f"| {args.label} | {preset} | {bare['rows']} x {bare['seq']} | "
              f"{loop['tokens_per_s']:,.0f} | {bare['tokens_per_s']:,.0f} | "
              f"{loop['tokens_per_s'] / bare['tokens_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
