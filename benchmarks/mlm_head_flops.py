"""FLOPs of an MLM train step with the head on packed masked tokens against the dense head on
every position, from XLA's compiled cost analysis (no training; abstract inputs).

    .venv/bin/python benchmarks/mlm_head_flops.py            # ettin-150m, 8 x 1024, mask 0.3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ettin_jax.config import recipe_from_preset  # noqa: E402
from ettin_jax.config.schema import MeshConfig  # noqa: E402
from ettin_jax.models.describe import training_flops_per_token  # noqa: E402
from ettin_jax.training.mesh import batch_sharding, make_mesh  # noqa: E402
from ettin_jax.training.optimizer import make_optimizer  # noqa: E402
from ettin_jax.training.state import abstract_state, init_state_shardings  # noqa: E402
from ettin_jax.training.step import sharded_train_step  # noqa: E402
from provenance import print_provenance  # noqa: E402


def step_flops(preset: str, rows: int, seq: int, mask_ratio: float | None) -> float:
    """Compiled FLOPs of one MLM train step; mask_ratio None: the dense head."""
    recipe = recipe_from_preset(preset)
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    optimizer = make_optimizer(recipe.optimizer)
    shardings = init_state_shardings(recipe.model, "mlm", optimizer, mesh)
    state = abstract_state(shardings, recipe.model, "mlm", optimizer)
    batch = {key: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=batch_sharding(mesh))
             for key in ("input_ids", "segment_ids", "positions", "labels")}
    step = sharded_train_step(recipe.model, "mlm", optimizer, shardings, mesh, seed=0,
                              learning_rate=1e-3, mlm_mask_ratio=mask_ratio)
    compiled = step.lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ettin-150m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--mask-ratio", type=float, default=0.3)
    args = parser.parse_args()
    print_provenance()
    tokens = args.rows * args.seq
    packed = step_flops(args.preset, args.rows, args.seq, args.mask_ratio)
    dense = step_flops(args.preset, args.rows, args.seq, None)
    recipe = recipe_from_preset(args.preset)
    estimate = training_flops_per_token(recipe.model, "mlm", seq_len=args.seq,
                                        mlm_mask_ratio=args.mask_ratio)["total"]
    print(f"| {args.preset} MLM train step, {args.rows} x {args.seq}, mask {args.mask_ratio} | "
          f"compiled FLOPs | per token |")
    print("|---|---|---|")
    print(f"| dense head (every position) | {dense:.4e} | {dense / tokens:.4e} |")
    print(f"| packed masked tokens | {packed:.4e} | {packed / tokens:.4e} |")
    print(f"| packed / dense | {packed / dense:.3f} | |")
    print(f"| `describe` estimate (packed) | {estimate * tokens:.4e} | {estimate:.4e} |")


if __name__ == "__main__":
    main()
