"""How long the real train step takes to trace/lower and to compile: for a TPU topology ahead of
time (libtpu, no TPU needed), or for this machine's CPU; one member, one process, no warm-up.

    .venv/bin/python benchmarks/compile_time.py tpu recipes/ettin-1b.yaml --topology v5p:4x4x4
    .venv/bin/python benchmarks/compile_time.py cpu recipes/ettin-150m.yaml --rows 2 --seq 128
    .venv/bin/python benchmarks/compile_time.py cpu recipes/ettin-150m.yaml --cache DIR  # twice
    .venv/bin/python benchmarks/compile_time.py cpu recipes/ettin-150m.yaml --rows 8 --fsdp 8
    ... model.scan_layers=false        # recipe overrides: the unrolled layer stack

The TPU step is the recipe's (its mesh over the topology's chips, its microbatches and rows, as
`ettin-jax describe --tpu-topology` compiles it). The CPU step runs on one device (or --fsdp N
fake devices, parameters sharded over them) with --rows rows of --seq tokens, no microbatches.
Without --cache the persistent compilation cache is off, so every compile is cold; with --cache
DIR it is on in DIR (`enable_compilation_cache`): a second process with the same DIR shows the
warm-cache compile time. Prints wall and CPU seconds (CPU time is steadier on a shared machine)
and the compiled step's temporary bytes per device.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ettin_jax.config import load_recipe  # noqa: E402
from ettin_jax.training.mesh import batch_sharding, make_mesh  # noqa: E402
from ettin_jax.training.optimizer import make_optimizer  # noqa: E402
from ettin_jax.training.state import abstract_state, init_state_shardings  # noqa: E402
from ettin_jax.training.step import sharded_train_step  # noqa: E402
from provenance import print_provenance  # noqa: E402


def time_step(recipe, objective: str, mesh, rows: int, microbatch_size: int | None) -> dict:
    """Seconds (wall and this process's CPU time) to trace and lower, and to compile,
    `objective`'s sharded train step for `mesh` with abstract state and a [rows, seq_len]
    batch, and the compiled step's temporary bytes per device."""
    optimizer = make_optimizer(recipe.optimizer)
    shardings = init_state_shardings(recipe.model, objective, optimizer, mesh)
    state = abstract_state(shardings, recipe.model, objective, optimizer)
    batch = {k: jax.ShapeDtypeStruct((rows, recipe.train.seq_len), jnp.int32,
                                     sharding=batch_sharding(mesh))
             for k in ("input_ids", "segment_ids", "positions", "labels")}
    # The step takes its learning rate as an argument before commit abd9829 (the "before"
    # measurements), as a schedule since.
    scheduled = "learning_rate" in inspect.signature(sharded_train_step).parameters
    schedule = {"learning_rate": recipe.optimizer.learning_rate} if scheduled else {}
    step = sharded_train_step(recipe.model, objective, optimizer, shardings, mesh, seed=0,
                              microbatch_size=microbatch_size,
                              mlm_mask_ratio=recipe.data.mlm_mask_ratio, **schedule)
    arguments = (state, batch) if scheduled else (
        state, batch, jax.ShapeDtypeStruct((), jnp.float32))
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = step.lower(*arguments)
    lowered_at, cpu_lowered_at = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    done, cpu_done = time.perf_counter(), time.process_time()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
            "lower_cpu_s": cpu_lowered_at - cpu_start, "compile_cpu_s": cpu_done - cpu_lowered_at,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("tpu", "cpu"))
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--objective", default="mlm", choices=("mlm", "clm"))
    parser.add_argument("--topology", default="v5p:4x4x4", help="tpu: the slice to compile for")
    parser.add_argument("--rows", type=int, default=2, help="cpu: batch rows")
    parser.add_argument("--seq", type=int, default=128, help="cpu: tokens per row")
    parser.add_argument("--fsdp", type=int, default=1,
                        help="cpu: shard parameters over this many fake CPU devices (FSDP)")
    parser.add_argument("--cache", help="persistent compilation cache directory (default: off)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()

    if args.target == "cpu" and args.fsdp > 1:
        jax.config.update("jax_num_cpu_devices", args.fsdp)
    if args.cache:
        from ettin_jax.compilation_cache import enable_compilation_cache

        enable_compilation_cache(args.cache)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    overrides = list(args.overrides)
    if args.target == "cpu":
        overrides += ["mesh.data=1", f"mesh.fsdp={args.fsdp}", f"train.seq_len={args.seq}"]
    recipe = load_recipe(args.recipe, overrides)
    if args.target == "tpu":
        from ettin_jax.training.aot import step_rows, topology_devices

        mesh = make_mesh(recipe.mesh, topology_devices(args.topology))
        rows, microbatch = step_rows(recipe, mesh), recipe.train.microbatch_size
    else:
        mesh = make_mesh(recipe.mesh, jax.devices()[:args.fsdp])
        rows, microbatch = args.rows, None
    print_provenance(f"{args.target} {args.recipe} {args.objective}; mesh {dict(mesh.shape)}; "
                     f"rows {rows} x {recipe.train.seq_len}, microbatch {microbatch}; "
                     f"scan_layers {getattr(recipe.model, 'scan_layers', 'n/a')}; "
                     f"cache {args.cache or 'off'}")
    result = time_step(recipe, args.objective, mesh, rows, microbatch)
    print(f"trace+lower {result['lower_s']:.1f} s (CPU {result['lower_cpu_s']:.1f} s), "
          f"compile {result['compile_s']:.1f} s (CPU {result['compile_cpu_s']:.1f} s), "
          f"temporaries {result['temp_bytes'] / 2**20:.1f} MiB per device")


if __name__ == "__main__":
    main()
