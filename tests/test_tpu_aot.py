"""The real train step AOT-compiled for a TPU topology on this CPU machine (libtpu, no TPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _describe(*overrides: str) -> dict:
    command = [sys.executable, "-m", "ettin_jax", "describe", str(ROOT / "recipes" / "tiny.yaml"),
               "mesh.data=-1", "mesh.fsdp=4", "train.global_batch_size=16", *overrides,
               "--tpu-topology", "v5p:2x2x1", "--json"]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    return json.loads(out)["tpu"]


def test_describe_reports_per_chip_memory_for_a_tpu_topology():
    tpu = _describe("train.seq_len=128")
    assert tpu["chips"] == 4 and tpu["mesh"] == {"data": 1, "fsdp": 4}
    for member in ("encoder", "decoder"):
        report = tpu[member]
        # At least the fp32 params + two Adam moments (sharded 4 ways) live on each chip.
        assert report["per_chip_bytes"] > 3 * 706_816 * 4 / 4
        assert report["per_chip_bytes"] < 1 << 30 and report["fits"] is True
    assert _describe("train.seq_len=256")["encoder"]["temp_bytes"] > tpu["encoder"]["temp_bytes"]


def test_unknown_topology_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "ettin_jax", "describe", "tiny",
                             "--tpu-topology", "v99:1x1"], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2 and "TPU topology 'v99:1x1' is not available" in result.stderr
