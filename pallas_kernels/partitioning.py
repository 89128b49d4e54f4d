"""Running a kernel on a mesh, shard by shard.

A Pallas kernel is an opaque custom call to XLA's SPMD partitioner, which would gather sharded
inputs onto every device before it (under FSDP or data parallelism: the whole batch). Kernels
whose work is independent along the batch (and heads) run instead under `jax.shard_map`, each
device on its own shard: the caller, who knows the mesh, says where those dimensions live with
a `ShardedOver`. (`jax.experimental.custom_partitioning` would let XLA decide this without the
caller's help, but it does not work on TPU: jax-ml/jax#38196.)
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, PartitionSpec


@dataclasses.dataclass(frozen=True)
class ShardedOver:
    """The mesh axes that split a kernel's independent dimensions: `batch` (rows) and `heads`
    (attention heads, tensor parallelism). Hashable, so models keep it as a static attribute."""

    mesh: Mesh
    batch: tuple[str, ...]
    heads: tuple[str, ...] = ()

    def spec(self, *dims: str | None) -> PartitionSpec:
        """PartitionSpec of an array whose dimensions are named "batch", "heads" or None."""
        axes = {"batch": self.batch or None, "heads": self.heads or None}
        return PartitionSpec(*(axes[d] if d is not None else None for d in dims))
