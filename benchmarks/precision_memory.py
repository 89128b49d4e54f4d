"""What model.precision=autocast costs in per-chip memory against uniform bf16, from the TPU AOT
compile of the real train step (both members), for recipe phases on a TPU topology. Prints a
Markdown table: arguments, outputs not aliased to (donated) arguments, temporaries and their sum
per chip, for each precision, and the difference.

    .venv/bin/python benchmarks/precision_memory.py       # ettin-150m pretrain, ettin-1b extension
    .venv/bin/python benchmarks/precision_memory.py --jobs recipes/ettin-400m.yaml:extension
    .venv/bin/python benchmarks/precision_memory.py --topology v5p:2x2x4 train.microbatch_size=16

A job is RECIPE[:PHASE] (default phase: the first). Overrides apply to every recipe, before the
phase is picked; model.precision is set by the script. The compile is the one `ettin-jax
describe RECIPE --tpu-topology ...` runs (`ettin_jax.training.aot.compiled_step_memory`: the
sharded train step of `ettin_jax.training.step` with abstract state and batch on the recipe's
mesh), with every field of the executable's memory analysis.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ettin_jax.config import load_recipe  # noqa: E402
from ettin_jax.training.aot import compiled_step_memory, step_rows, topology_devices  # noqa: E402
from ettin_jax.training.mesh import make_mesh  # noqa: E402
from ettin_jax.training.phases import phase_named  # noqa: E402
from provenance import print_provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOBS = [f"{ROOT / 'recipes' / 'ettin-150m.yaml'}:pretrain",
        f"{ROOT / 'recipes' / 'ettin-1b.yaml'}:extension"]
PRECISIONS = ("uniform", "autocast")
GIB = 2**30


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _job_recipe(job: str, overrides: list[str], precision: str):
    path, _, phase = job.partition(":")
    recipe = load_recipe(Path(path), [*overrides, f"model.precision={precision}"])
    if phase:
        recipe = recipe.phase_recipe(phase_named(recipe, phase))
    return Path(path).name, phase or recipe.run_phases()[0].name, recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=JOBS, metavar="RECIPE[:PHASE]")
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides applied to every recipe")
    args = parser.parse_args()
    devices = topology_devices(args.topology)
    print_provenance(f"topology {args.topology} ({len(devices)} chips); libtpu "
                     f"{_libtpu_version()}"
                     f"{'; overrides ' + ' '.join(args.overrides) if args.overrides else ''}")
    print("| recipe | phase | seq | rows per chip per microbatch | mesh (data x fsdp) | member | "
          "precision | arguments GiB | outputs (aliased) GiB | temporaries GiB | per chip GiB "
          "| autocast - uniform | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for job in args.jobs:
        for member, objective in (("encoder", "mlm"), ("decoder", "clm")):
            uniform = None
            for precision in PRECISIONS:
                name, phase, recipe = _job_recipe(job, args.overrides, precision)
                mesh = make_mesh(recipe.mesh, devices)
                per_chip_rows = (recipe.train.microbatch_size
                                 or step_rows(recipe, mesh)) // mesh.size
                row = (f"| {name} | {phase} | {recipe.train.seq_len} | {per_chip_rows} | "
                       f"{mesh.shape['data']} x {mesh.shape['fsdp']} | {member} | {precision} |")
                start = time.perf_counter()
                try:
                    found = compiled_step_memory(recipe, objective, mesh)
                except Exception as err:  # XLA reports out-of-memory as a compile error
                    print(f"{row} error: {str(err).splitlines()[0]} | | | | | "
                          f"{time.perf_counter() - start:.0f} |", flush=True)
                    continue
                delta = ""
                if precision == "uniform":
                    uniform = found["per_chip"]
                elif uniform:
                    diff = found["per_chip"] - uniform
                    delta = f"{diff / 2**20:+,.0f} MiB ({diff / uniform:+.1%})"
                print(f"{row} {found['arguments'] / GIB:.2f} | {found['outputs'] / GIB:.2f} "
                      f"({found['aliased'] / GIB:.2f}) | {found['temporaries'] / GIB:.2f} | "
                      f"{found['per_chip'] / GIB:.2f} | {delta} | "
                      f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
