"""Process set-up before JAX starts: fake CPU devices, and multi-host initialisation."""

from __future__ import annotations

import os

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
    """Whether the environment describes several processes (SLURM, or a multi-host TPU)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts and not any(ch.isspace() for ch in hosts)
