"""Does every Ettin recipe fit a TPU chip (phase 1, or --phase)? AOT-compiles the real train step of both
members for a TPU topology on this machine (libtpu, no TPU needed) and prints a Markdown table of
per-chip memory from the compiled executables.

    .venv/bin/python benchmarks/tpu_fit.py                       # recipes/ettin-*.yaml, v5p:4x4x4
    .venv/bin/python benchmarks/tpu_fit.py --recipes recipes/ettin-1b.yaml --topology v5p:2x2x4
    .venv/bin/python benchmarks/tpu_fit.py model.attention_impl=pallas   # overrides, every recipe
    .venv/bin/python benchmarks/tpu_fit.py --phase extension    # another phase of the recipes
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from data_pipelines.microbatches import microbatch_rows  # noqa: E402
from ettin_jax.config import load_recipe  # noqa: E402
from ettin_jax.training.aot import tpu_memory_report  # noqa: E402
from ettin_jax.training.phases import phase_named  # noqa: E402
from provenance import print_provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASE_1 = [ROOT / "recipes" / f"ettin-{size}.yaml"
           for size in ("17m", "32m", "68m", "150m", "400m", "1b")]
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", type=Path, default=PHASE_1)
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("--phase", help="the recipe phase to compile (default: the first)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides applied to every recipe")
    args = parser.parse_args()
    print_provenance(f"topology {args.topology}; phase {args.phase or 'first'}"
                     f"{'; overrides ' + ' '.join(args.overrides) if args.overrides else ''}")
    print("| recipe | mesh (data x fsdp) | rows per chip per microbatch | member | per-chip GiB "
          "(arguments + temporaries) | of HBM GiB | fits | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.recipes:
        recipe = load_recipe(path, args.overrides)
        if args.phase:
            recipe = recipe.phase_recipe(phase_named(recipe, args.phase))
        start = time.perf_counter()
        report = tpu_memory_report(recipe, args.topology)
        seconds = (time.perf_counter() - start) / 2
        mesh = f"{report['mesh']['data']} x {report['mesh']['fsdp']}"
        per_chip = (microbatch_rows(report["rows"], recipe.train.microbatch_size,
                                    recipe.train.max_microbatch_size)
                    or report["rows"]) // report["chips"]
        for member in ("encoder", "decoder"):
            entry = report[member]
            if "error" in entry:
                print(f"| {path.name} | {mesh} | {per_chip} | {member} | error: "
                      f"{entry['error']} | | no | {seconds:.0f} |")
                continue
            print(f"| {path.name} | {mesh} | {per_chip} | {member} | "
                  f"{entry['per_chip_bytes'] / GIB:.1f} ({entry['argument_bytes'] / GIB:.2f} + "
                  f"{entry['temp_bytes'] / GIB:.1f}) | {report['hbm_bytes'] / GIB:.0f} | "
                  f"{'yes' if entry['fits'] else 'NO'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
