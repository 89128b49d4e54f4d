"""Ahead-of-time compilation of the real train step for a TPU topology, without a TPU.

With libtpu installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes a pod
slice (e.g. "v5p:4x4x4": 64 chips on 16 hosts); the step is lowered with abstract, sharded
arguments on that mesh and compiled, and the executable's memory analysis says what one chip
needs. `ettin-jax describe RECIPE --tpu-topology v5p:4x4x4 --json` reports it per member.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ettin_jax.config import Recipe
from ettin_jax.errors import ConfigError
from ettin_jax.training.batch_sizing import batch_size
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import abstract_state, init_state_shardings
from ettin_jax.training.step import sharded_train_step

# Per-chip HBM of TPU generations (bytes), for the "fits" verdict.
HBM_BYTES = {"v5p": 95 * 2**30, "v5e": 16 * 2**30, "v4": 32 * 2**30, "v6e": 32 * 2**30}


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` ("v5p:4x4x4"). Raises ConfigError without libtpu."""
    from jax.experimental import topologies

    from ettin_jax.platforms import quiet_tpu_host_discovery

    quiet_tpu_host_discovery()

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # libtpu missing or an unknown topology name
        raise ConfigError(f"TPU topology {name!r} is not available ({err}); install the TPU "
                          f"extra: pip install -e '.[tpu]'") from None


def tpu_memory_report(recipe: Recipe, topology: str) -> dict[str, Any]:
    """Per-chip bytes of the compiled train step of each member on `topology`, with the
    recipe's mesh (mesh.data x mesh.fsdp over the topology's chips) and microbatches; a batch
    sized in tokens takes the rows of the assumed packing fill (`batch_sizing`), reported as
    "rows"."""
    devices = topology_devices(topology)
    mesh = make_mesh(recipe.mesh, devices)
    train = recipe.train
    rows = batch_size(train, packing_fill=None, row_multiple=mesh.size).rows
    generation = topology.split(":")[0]
    report: dict[str, Any] = {"topology": topology, "chips": len(devices),
                              "mesh": dict(mesh.shape), "rows": rows,
                              "hbm_bytes": HBM_BYTES.get(generation)}
    for member, objective in (("encoder", "mlm"), ("decoder", "clm")):
        optimizer = make_optimizer(recipe.optimizer)
        shardings = init_state_shardings(recipe.model, objective, optimizer, mesh)
        state = abstract_state(shardings, recipe.model, objective, optimizer)
        row_sharding = batch_sharding(mesh)
        shape = (rows, train.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=row_sharding)
                 for k in ("input_ids", "segment_ids", "positions", "labels")}
        step = sharded_train_step(recipe.model, objective, optimizer, shardings, mesh, seed=0,
                                  microbatch_size=train.microbatch_size,
                                  mlm_mask_ratio=recipe.data.mlm_mask_ratio)
        try:
            compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        except Exception as err:  # XLA reports out-of-memory as a compile error
            report[member] = {"error": str(err).splitlines()[0]}
            continue
        memory = compiled.memory_analysis()
        per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        report[member] = {"per_chip_bytes": int(per_chip),
                          "temp_bytes": int(memory.temp_size_in_bytes),
                          "argument_bytes": int(memory.argument_size_in_bytes)}
        if report["hbm_bytes"]:
            report[member]["fits"] = per_chip <= report["hbm_bytes"]
    return report
