"""The header every benchmark prints: the command that ran and the machine it ran on."""

from __future__ import annotations

import os
import platform
import sys


def print_provenance(details: str = "") -> None:
    """Prints `command: ...` and `machine: ...` (platform, CPU cores, Python, and JAX with its
    first device when JAX is imported), then `details` and a blank line."""
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    machine = f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        machine += f", JAX {jax.__version__} on {jax.devices()[0].device_kind}"
    print(f"machine: {machine}")
    if details:
        print(details)
    print()
