"""Per-chip memory and collectives of the compiled train step on a TPU topology (AOT with
libtpu, no TPU): for each member, the compiled program's memory analysis and its collectives
by kind, dtype and whether they run inside the microbatch loop (`ettin_jax.training.hlo`).

    .venv/bin/python benchmarks/step_collectives.py recipes/ettin-68m.yaml mesh.data=1 \\
        mesh.fsdp=4 train.microbatch_size=36 --topology v5p:2x2x1 --hlo /tmp/hlo-fsdp
    .venv/bin/python benchmarks/step_collectives.py --read /tmp/hlo-fsdp   # tables again

Collectives are counted by instruction (a tuple all-reduce of many gradients counts once;
"arrays" says how many arrays it carries) with the bytes of their results.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ettin_jax.config import load_recipe  # noqa: E402
from ettin_jax.training.aot import tpu_memory_report  # noqa: E402
from ettin_jax.training.hlo import collectives  # noqa: E402
from provenance import print_provenance  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, nargs="?")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--hlo", metavar="DIR", help="also write each member's HLO text here")
    parser.add_argument("--read", metavar="DIR", help="only print the tables of the HLO files "
                        "an earlier run wrote to DIR (no compiling)")
    args = parser.parse_args()
    if args.read:
        for member in ("encoder", "decoder"):
            print(f"{member} ({args.read}):\n")
            print_table((Path(args.read) / f"{member}.hlo.txt").read_text())
        return
    recipe = load_recipe(args.recipe, args.overrides)
    print_provenance(f"topology {args.topology}; {args.recipe.name} {' '.join(args.overrides)}")
    report = tpu_memory_report(recipe, args.topology, hlo_dir=args.hlo or "/tmp/step-hlo")
    print(f"mesh {report['mesh']}, {report['rows']} rows per step, microbatches of "
          f"{recipe.train.microbatch_size} rows\n")
    for member in ("encoder", "decoder"):
        entry = report[member]
        if "error" in entry:
            print(f"{member}: error {entry['error']}\n")
            continue
        print(f"{member}: per chip {entry['per_chip_bytes'] / MIB:.0f} MiB (arguments "
              f"{entry['argument_bytes'] / MIB:.0f} MiB, temporaries "
              f"{entry['temp_bytes'] / MIB:.0f} MiB)\n")
        print_table((Path(args.hlo or "/tmp/step-hlo") / f"{member}.hlo.txt").read_text())


def print_table(hlo_text: str) -> None:
    """A Markdown table of the collectives of `hlo_text` by kind, dtype and place."""
    rows: dict[tuple, list[int]] = {}
    for c in collectives(hlo_text):
        key = (c.kind, c.dtype, "in a loop" if c.in_loop else "outside loops")
        found = rows.setdefault(key, [0, 0, 0])
        found[0] += 1
        found[1] += len(c.shapes)
        found[2] += c.bytes
    print("| collective | dtype | where | count | arrays | MiB |")
    print("|---|---|---|---|---|---|")
    for (kind, dtype, where), (count, arrays, size) in sorted(rows.items()):
        print(f"| {kind} | {dtype} | {where} | {count} | {arrays} | {size / MIB:.1f} |")
    print(flush=True)


if __name__ == "__main__":
    main()
