"""Ahead-of-time compilation of the real train step for a TPU topology, without a TPU.

With libtpu installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes a pod
slice (e.g. "v5p:4x4x4": 64 chips on 16 hosts); the step is lowered with abstract, sharded
arguments on that mesh and compiled, and the executable's memory analysis says what one chip
needs. `ettin-jax describe RECIPE --tpu-topology v5p:4x4x4 --json` reports it per member.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ettin_jax.config import Recipe
from ettin_jax.errors import ConfigError
from ettin_jax.training.batch_sizing import batch_size
from ettin_jax.training.hlo import collectives, summary
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import TrainState, abstract_state, init_state_shardings
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


def tpu_memory_report(recipe: Recipe, topology: str,
                      hlo_dir: str | Path | None = None) -> dict[str, Any]:
    """Per-chip bytes of the compiled train step of each member on `topology`, with the
    recipe's mesh (mesh.data x mesh.fsdp over the topology's chips) and microbatches; a batch
    sized in tokens takes the rows of the assumed packing fill (`batch_sizing`), reported as
    "rows". With `hlo_dir`, each member's compiled HLO text is written to
    hlo_dir/encoder.hlo.txt and hlo_dir/decoder.hlo.txt (the directory is created) and its
    collectives are summarised under "collectives" (`hlo.summary`)."""
    devices = topology_devices(topology)
    mesh = make_mesh(recipe.mesh, devices)
    generation = topology.split(":")[0]
    report: dict[str, Any] = {"topology": topology, "chips": len(devices),
                              "mesh": dict(mesh.shape), "rows": step_rows(recipe, mesh),
                              "hbm_bytes": HBM_BYTES.get(generation)}
    for member, objective in (("encoder", "mlm"), ("decoder", "clm")):
        try:
            compiled = compile_step(recipe, objective, mesh)
        except Exception as err:  # XLA reports out-of-memory as a compile error
            report[member] = {"error": str(err).splitlines()[0]}
            continue
        memory = step_memory(compiled)
        report[member] = {"per_chip_bytes": memory["per_chip"],
                          "temp_bytes": memory["temporaries"],
                          "argument_bytes": memory["arguments"]}
        if hlo_dir is not None:
            text = compiled.as_text()
            Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            (Path(hlo_dir) / f"{member}.hlo.txt").write_text(text)
            report[member]["collectives"] = summary(collectives(text))
        if report["hbm_bytes"]:
            report[member]["fits"] = memory["per_chip"] <= report["hbm_bytes"]
    return report


def step_rows(recipe: Recipe, mesh) -> int:
    """Rows of the compiled full batch: train.global_batch_size, or for a batch sized in
    tokens the rows at the assumed packing fill."""
    return batch_size(recipe.train, packing_fill=None, row_multiple=mesh.size).rows


def compiled_step_memory(recipe: Recipe, objective: str, mesh) -> dict[str, int]:
    """The memory analysis (bytes per chip) of `objective`'s train step compiled for `mesh`
    (abstract state and batch, the recipe's microbatches): arguments, outputs, aliased
    (outputs living in donated arguments), temporaries, and per_chip = arguments + outputs -
    aliased + temporaries. Raises what the compile raises (XLA reports out-of-memory so)."""
    return step_memory(compile_step(recipe, objective, mesh))


def compile_step(recipe: Recipe, objective: str, mesh) -> Any:
    """`objective`'s train step compiled for `mesh` with abstract state and batch (the
    recipe's batch rows and microbatches): a jax.stages.Compiled. Raises what the compile
    raises (XLA reports out-of-memory so)."""
    step, state, batch = abstract_step(recipe, objective, mesh)
    return step.lower(state, batch).compile()


def abstract_step(recipe: Recipe, objective: str, mesh) -> tuple[Any, TrainState, dict]:
    """(the jitted train step of `objective` on `mesh` as training builds it: the recipe's
    optimizer, microbatches and MLM mask ratio; its abstract state; an abstract batch of the
    recipe's rows, `step_rows`), ready to lower, trace or compile without allocating."""
    train = recipe.train
    optimizer = make_optimizer(recipe.optimizer)
    shardings = init_state_shardings(recipe.model, objective, optimizer, mesh)
    state = abstract_state(shardings, recipe.model, objective, optimizer)
    batch = {k: jax.ShapeDtypeStruct((step_rows(recipe, mesh), train.seq_len), jnp.int32,
                                     sharding=batch_sharding(mesh))
             for k in ("input_ids", "segment_ids", "positions", "labels")}
    step = sharded_train_step(recipe.model, objective, optimizer, shardings, mesh, seed=0,
                              learning_rate=recipe.optimizer.learning_rate,
                              microbatch_size=train.microbatch_size,
                              max_microbatch_size=train.max_microbatch_size,
                              mlm_mask_ratio=recipe.data.mlm_mask_ratio)
    return step, state, batch


def step_memory(compiled: Any) -> dict[str, int]:
    """`compiled_step_memory`'s figures of an already compiled step."""
    memory = compiled.memory_analysis()
    found = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes}
    found["per_chip"] = (found["arguments"] + found["outputs"] - found["aliased"]
                         + found["temporaries"])
    return {k: int(v) for k, v in found.items()}
