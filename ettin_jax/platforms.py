"""Which platforms JAX starts, decided before it starts.

`make install` brings libtpu (the `tpu` extra) so that any machine can compile for a TPU topology
ahead of time. Left alone, JAX then probes the TPU runtime at start-up on every machine, and
libtpu prints start-up errors about missing TPU hosts on one without a TPU. So the command line
asks for the TPU platform only where a TPU chip is attached (or the user chose platforms with
JAX_PLATFORMS), and quiets libtpu's host discovery when it is loaded only to describe a topology.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
from pathlib import Path

# PCI vendor id of Google's TPU chips, as sysfs lists it (what JAX itself checks).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips_attached() -> bool:
    """Whether a TPU chip is attached to this machine (a Google PCI device, the check JAX
    makes itself). False on CPU and GPU machines."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def _gpu_platform() -> str | None:
    """"cuda" or "rocm" when that JAX plugin is installed and such a GPU is visible."""
    plugins = " ".join(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
    if "cuda" in plugins and glob.glob("/dev/nvidia[0-9]*"):
        return "cuda"
    if "rocm" in plugins and os.path.exists("/dev/kfd"):
        return "rocm"
    return None


def select_platforms() -> str | None:
    """Sets JAX's platforms for this process unless the user chose them (JAX_PLATFORMS) or a
    TPU is attached: the GPU platform when one is usable, then the CPU. Call before JAX
    initialises its backends. Returns the platforms set, or None when JAX is left to choose."""
    if os.environ.get("JAX_PLATFORMS") or tpu_chips_attached():
        return None
    import jax

    gpu = _gpu_platform()
    platforms = f"{gpu},cpu" if gpu else "cpu"
    jax.config.update("jax_platforms", platforms)
    return platforms


def quiet_tpu_host_discovery() -> None:
    """Before libtpu is loaded to describe a TPU topology on a machine without a TPU: tells it
    that this is one host of a known kind, so that it does not look for TPU workers and print
    errors about them. The topology compiled for is named explicitly and is not affected.
    Leaves the variables alone where they are set or a TPU is attached."""
    if tpu_chips_attached():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
