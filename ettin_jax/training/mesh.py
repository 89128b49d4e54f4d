"""The device mesh and the one table that maps the model's logical axes onto it.

Mesh axes: `data` (replicas) and `fsdp` (parameter and optimizer-state shards); a `tensor` axis
would be one more entry in MESH_AXES and RULES. The batch is split over both axes. Parameters are
replicated over `data` and, under FSDP, stored split along their `embed` dimension (every weight
matrix has one; norm scales and the decoder bias are small and stay replicated). For compute,
each weight is gathered whole and its gradient scattered back: the train step does it per
device under shard_map (`ettin_jax.training.step`), evaluation through `compute_sharding`
constraints. Left to itself, XLA's partitioner may instead gather the activations of the whole
batch onto every device, which costs memory proportional to the device count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ettin_jax.config.schema import MeshConfig
from ettin_jax.errors import ConfigError
from pallas_kernels.partitioning import ShardedOver

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # rows of a batch are split over every device

# logical axis name (ettin_jax.models.layers) -> mesh axis or None (replicated)
RULES: dict[str, str | None] = {
    "vocab": None,
    "embed": "fsdp",
    "heads": None,
    "qkv": None,
    "mlp": None,
    "glu": None,
    "norm": None,
}


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); -1 fills with the remaining devices.

    Auto axis types, so sharding constraints and jit in/out shardings work as before.
    Raises ConfigError naming mesh.data, mesh.fsdp and the device count when they do not match.
    """
    devices = list(devices if devices is not None else jax.devices())
    count = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if count % known:
            raise ConfigError(f"mesh: {count} devices cannot be split into "
                              f"mesh.data={config.data} x mesh.fsdp={config.fsdp}")
        data, fsdp = (count // known, fsdp) if data == -1 else (data, count // known)
    if data * fsdp != count:
        raise ConfigError(f"mesh: mesh.data={config.data} x mesh.fsdp={config.fsdp} = "
                          f"{data * fsdp} devices, but {count} are available")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh(spec: PartitionSpec) -> PartitionSpec:
    """The mesh PartitionSpec of a parameter with logical axes `spec`, by RULES."""
    return PartitionSpec(*(RULES.get(name) if name is not None else None for name in spec))


def parameter_sharding(mesh: Mesh, logical: PartitionSpec, shape: Sequence[int],
                       name: str) -> NamedSharding:
    """NamedSharding of one parameter; ConfigError when a dimension does not divide evenly."""
    spec = logical_to_mesh(logical)
    for axis, mesh_axis in zip(shape, spec):
        if mesh_axis is not None and axis % mesh.shape[mesh_axis]:
            raise ConfigError(f"mesh: parameter {name} dimension {axis} is not divisible by "
                              f"{mesh_axis}={mesh.shape[mesh_axis]}")
    return NamedSharding(mesh, spec)


def compute_sharding(storage: NamedSharding) -> NamedSharding:
    """Where a parameter stored on `storage` lives while the model computes with it: its FSDP
    shards gathered, any other mesh axis kept."""
    def without_fsdp(entry):
        if isinstance(entry, tuple):
            kept = tuple(axis for axis in entry if axis != "fsdp")
            return kept or None
        return None if entry == "fsdp" else entry

    return NamedSharding(storage.mesh, PartitionSpec(*map(without_fsdp, storage.spec)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device, sequence replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def kernel_sharding(mesh: Mesh) -> ShardedOver:
    """Where a batch lives for the kernels that run shard by shard (attention, masked-token
    packing): rows over every device, heads whole."""
    return ShardedOver(mesh, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, PartitionSpec())
