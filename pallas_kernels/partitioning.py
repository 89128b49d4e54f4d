"""Running a kernel shard by shard under XLA's SPMD partitioner.

A Pallas kernel is an opaque custom call to the partitioner, which would gather its sharded
inputs onto every device first (under FSDP or data parallelism: the whole batch). A kernel
whose work is independent along some dimensions (batch, heads) can run on each device's own
shard instead; `partitioned` says so with `jax.experimental.custom_partitioning`, using an
einsum-like rule over named factors, e.g. "b s h d, b s -> b s h d" with `replicated=("s",
"d")`: every factor keeps its sharding except the replicated ones, gathered when sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def _parse(rule: str) -> tuple[list[list[str]], list[list[str]]]:
    operands, results = rule.split("->")
    split = lambda side: [term.split() for term in side.split(",")]  # noqa: E731
    return split(operands), split(results)


def _shardings(mesh, operands: list[list[str]], results: list[list[str]], arg_shapes,
               replicated: Sequence[str]):
    """Shardings of every operand and result: each factor takes the mesh axes it has in the
    first operand that shards it, replicated factors none."""
    axes: dict[str, object] = {}
    for factors, shape in zip(operands, arg_shapes):
        spec = tuple(shape.sharding.spec) + (None,) * (len(factors) - len(shape.sharding.spec))
        for factor, entry in zip(factors, spec):
            if entry is not None and factor not in replicated:
                axes.setdefault(factor, entry)
    used: set = set()
    for factor, entry in list(axes.items()):  # a mesh axis may shard one factor only
        names = set(entry if isinstance(entry, tuple) else (entry,))
        if names & used:
            del axes[factor]
        used |= names

    def sharding(factors):
        return NamedSharding(mesh, PartitionSpec(*(axes.get(f) for f in factors)))

    return [sharding(f) for f in operands], [sharding(f) for f in results]


def partitioned(fun: Callable, rule: str, *, replicated: Sequence[str],
                static_argnums: Sequence[int] = ()) -> Callable:
    """`fun` run by the SPMD partitioner on each device's shard of the factors of `rule` that
    are not `replicated` (their shards must be independent in `fun`). Positional arguments at
    `static_argnums` are static (hashable). Returns a function with `fun`'s signature; a
    single result or a tuple, as `fun` returns."""
    operands, results = _parse(rule)
    wrapped = custom_partitioning(fun, static_argnums=tuple(static_argnums))

    def result_shardings(mesh, arg_shapes):
        _, out = _shardings(mesh, operands, results, arg_shapes, replicated)
        return out[0] if len(results) == 1 else tuple(out)

    def partition(*args):
        static, (mesh, arg_shapes, _) = args[:-3], args[-3:]
        ins, _ = _shardings(mesh, operands, results, arg_shapes, replicated)

        def lower(*arrays):
            dynamic = iter(arrays)
            full = [static[static_argnums.index(i)] if i in static_argnums else next(dynamic)
                    for i in range(len(arrays) + len(static))]
            return fun(*full)

        return mesh, lower, result_shardings(mesh, arg_shapes), tuple(ins)

    def infer(*args):
        mesh, arg_shapes, _ = args[-3:]
        return result_shardings(mesh, arg_shapes)

    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          sharding_rule=rule, need_replication_factors=tuple(replicated))
    return wrapped

