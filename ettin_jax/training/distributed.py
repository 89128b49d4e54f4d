"""Processes: set-up before JAX starts (fake CPU devices, multi-host initialisation), and the
few host-side values the processes of a run must agree on."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# How long a process waits for its peers at start-up before failing with an error.
INITIALIZATION_TIMEOUT_S = 300


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               peer_timeout_s: int = 100) -> None:
    """Prepares JAX for this process; call before any other JAX use.

    cpu_devices: run on that many fake CPU devices. coordinator / num_processes / process_id:
    explicit multi-host set-up (all three, or none: on TPU pods and under SLURM
    `jax.distributed.initialize` finds them itself). A peer silent for `peer_timeout_s` is
    declared dead and every process stops with an error instead of waiting forever. Raises
    ValueError for a partial set.
    """
    import jax

    if cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id,
                                   initialization_timeout=INITIALIZATION_TIMEOUT_S,
                                   heartbeat_timeout_seconds=peer_timeout_s)
    elif _in_a_cluster():
        jax.distributed.initialize(initialization_timeout=INITIALIZATION_TIMEOUT_S,
                                   heartbeat_timeout_seconds=peer_timeout_s)


def _in_a_cluster() -> bool:
    """Whether the environment describes several processes: SLURM, a multi-host TPU on GKE
    (TPU_WORKER_HOSTNAMES), or a Cloud TPU VM of a queued resource (`ettin-jax launch tpu`),
    which JAX recognises by asking the VM's metadata server, as `jax.distributed.initialize`
    does."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts and not any(ch.isspace() for ch in hosts):
        return True
    from jax._src import cloud_tpu_init
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster

    return cloud_tpu_init.running_in_cloud_tpu_vm and GceTpuCluster.is_env_present()


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective when there are several: every
    process must call it at the same point)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def tell_user(message: str) -> None:
    """One line for the user on stderr, from process 0 only (every process would say it)."""
    import sys

    import jax

    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def merged_across_processes(value: Any) -> Any:
    """The union of every process's JSON-able `value`: mappings merged key by key, anything
    else equal on every process (e.g. each process's data-iterator state of its own rows ->
    the state of every row). A collective: every process must call it at the same point.
    Raises ValueError naming the key where two processes disagree."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int64(encoded.size))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    values = [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths)]
    merged = values[0]
    for other in values[1:]:
        merged = _merge(merged, other, "")
    return merged


def _merge(a: Any, b: Any, key: str) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k], f"{key}.{k}") if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}
    if a != b:
        raise ValueError(f"processes disagree on {key or 'the value'}: {a!r} vs {b!r}")
    return a


class HostSum:
    """Sums of a host integer over the processes, exchanged through the coordination service's
    key-value store (`jax.distributed`): host to host, no device collective, so it may run on
    any thread while the devices compute. Every process makes the same calls in the same order
    from one thread, each call with its own value; `prefix` names the sequence and must be
    unique in the job. One process: the value itself, nothing exchanged."""

    def __init__(self, prefix: str, *, timeout_s: float = 600.0):
        self._prefix = prefix
        self._calls = 0
        self._timeout_s = timeout_s

    def __call__(self, value: int, *, stop: Any = None) -> int:
        """The sum of every process's `value` for this call. Waits for the other processes
        (up to timeout_s, then RuntimeError naming the process); `stop` (a threading.Event)
        set while waiting raises InterruptedError."""
        import jax

        if jax.process_count() == 1:
            return value
        import time

        from orbax.checkpoint import multihost

        client = multihost.get_jax_distributed_client()
        call, me = self._calls, jax.process_index()
        self._calls += 1
        client.key_value_set(f"{self._prefix}/{call}/{me}", str(int(value)))
        total = 0
        deadline = time.monotonic() + self._timeout_s
        for process in range(jax.process_count()):
            key = f"{self._prefix}/{call}/{process}"
            while True:
                try:
                    total += int(client.blocking_key_value_get(key, 200))
                    break
                except Exception as error:  # noqa: BLE001 - the client's timeout error type
                    if stop is not None and stop.is_set():
                        raise InterruptedError(f"stopped while waiting for {key}") from error
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"process {process} did not send {key} within "
                                           f"{self._timeout_s:.0f} s") from error
        # Every process has now finished the previous call (it sent this one after it), so
        # nobody reads our key of that call any more.
        if call:
            client.key_value_delete(f"{self._prefix}/{call - 1}/{me}")
        return total
