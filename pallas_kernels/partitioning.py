"""Running a kernel on a mesh, shard by shard.

A Pallas kernel is an opaque custom call to XLA's SPMD partitioner, which would gather sharded
inputs onto every device before it (under FSDP or data parallelism: the whole batch). Kernels
whose work is independent along the batch (and heads) run instead under `jax.shard_map`, each
device on its own shard: the caller, who knows the mesh, says where those dimensions live with
a `ShardedOver`. (`jax.experimental.custom_partitioning` would let XLA decide this without the
caller's help, but it does not work on TPU: jax-ml/jax#38196.)

The caller says it once, around the code it traces, rather than to every layer: models stay
free of meshes (one graph serves every mesh) and the kernels read the mesh when they are called:

    with kernels_sharded_over(ShardedOver(mesh, batch=("data", "fsdp"))):
        loss = model(...)          # traced inside a sharded jax.jit
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

import jax
from jax.sharding import Mesh, PartitionSpec


@dataclasses.dataclass(frozen=True)
class ShardedOver:
    """The mesh axes that split a kernel's independent dimensions: `batch` (rows) and `heads`
    (attention heads, tensor parallelism)."""

    mesh: Mesh
    batch: tuple[str, ...]
    heads: tuple[str, ...] = ()

    def spec(self, *dims: str | None) -> PartitionSpec:
        """PartitionSpec of an array whose dimensions are named "batch", "heads" or None."""
        axes = {"batch": self.batch or None, "heads": self.heads or None}
        return PartitionSpec(*(axes[d] if d is not None else None for d in dims))


_CURRENT: contextvars.ContextVar[ShardedOver | None] = contextvars.ContextVar(
    "kernels_sharded_over", default=None)


@contextlib.contextmanager
def kernels_sharded_over(sharded_over: ShardedOver | None) -> Iterator[None]:
    """Within the block, kernels run per shard of `sharded_over` (None: unsharded). Enter it
    inside the function that jax.jit traces, so that the compiled step carries it."""
    token = _CURRENT.set(sharded_over)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_sharding() -> ShardedOver | None:
    """The `ShardedOver` of the innermost `kernels_sharded_over` block, or None."""
    return _CURRENT.get()


def attention_per_shard(attention: Callable, sharded_over: ShardedOver | None) -> Callable:
    """`attention`(q, k, v [B, S, H, D], segment_ids [B, S]) -> [B, S, H, D], run by each device
    on its shard of batch and heads under `sharded_over` (None: the enclosing
    `kernels_sharded_over` block's; without either, `attention` itself, on whole arrays).
    `attention` must treat rows and heads independently; it sees the shard's shapes."""
    sharded_over = sharded_over or current_sharding()
    if sharded_over is None:
        return attention
    heads, rows = sharded_over.spec("batch", None, "heads", None), sharded_over.spec("batch")
    return jax.shard_map(attention, mesh=sharded_over.mesh,
                         in_specs=(heads, heads, heads, rows), out_specs=heads, check_vma=False)
