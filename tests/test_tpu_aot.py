"""Ahead-of-time compilation for a TPU topology on this CPU machine (libtpu, no TPU): the real
train step (`describe --tpu-topology`), and the Pallas kernels compiled by Mosaic. Everything is
compiled once, in the one subprocess of the `tpu_aot` fixture (tests/tpu_aot_jobs.py)."""

from __future__ import annotations

LIBTPU_NOISE = ("E0000", "TPU_WORKER_HOSTNAMES", "could not determine TPU")


def _result(tpu_aot: dict, job: str):
    entry = tpu_aot[job]
    assert "error" not in entry, entry["error"]
    return entry["result"]


def test_describe_reports_per_chip_memory_for_a_tpu_topology(tpu_aot):
    described = _result(tpu_aot, "describe_seq128")
    assert described["code"] == 0
    tpu = described["tpu"]
    assert tpu["chips"] == 4 and tpu["mesh"] == {"data": 1, "fsdp": 4}
    for member in ("encoder", "decoder"):
        report = tpu[member]
        # At least the fp32 params + two Adam moments (sharded 4 ways) live on each chip.
        assert report["per_chip_bytes"] > 3 * 706_816 * 4 / 4
        assert report["per_chip_bytes"] < 1 << 30 and report["fits"] is True
    longer = _result(tpu_aot, "describe_seq256")["tpu"]
    assert longer["encoder"]["temp_bytes"] > tpu["encoder"]["temp_bytes"]
    # libtpu is told it is one host here, so it prints no start-up errors about TPU workers.
    assert not any(noise in tpu_aot["describe_seq128"]["stderr"] for noise in LIBTPU_NOISE)


def test_unknown_topology_is_a_clear_error(tpu_aot):
    result = _result(tpu_aot, "unknown_topology")
    assert result["code"] == 2
    assert "TPU topology 'v99:1x1' is not available" in result["stderr"]


def test_flash_attention_compiles_with_mosaic(tpu_aot):
    """Compiling for a TPU topology picks the Mosaic kernels, which compile: forward, dq and
    dk/dv of global, causal-local and bidirectional-local attention, bf16 and fp32."""
    assert _result(tpu_aot, "flash_attention_kernels") == [3] * 6


def test_masked_packing_compiles_with_mosaic(tpu_aot):
    assert all(count >= 1 for count in _result(tpu_aot, "masked_packing_kernels"))


def test_train_step_runs_the_kernels_per_chip(tpu_aot):
    """The real FSDP train step with attention_impl=pallas: every layer's attention (forward,
    dq, dk/dv) and the MLM head's packing run as Mosaic kernels on each chip's shard, though
    the model's graph knows nothing of the mesh."""
    step = _result(tpu_aot, "pallas_train_step")
    assert step["custom_calls"] >= 3 * step["layers"] + 1


def test_auto_attention_compiles_the_chosen_kernel_for_tpu(tpu_aot):
    """attention_impl "auto", lowered for a TPU from this CPU process, is the kernel `AUTO`
    names for TPU, bit for bit in what it compiles to (same Mosaic kernels, same temporary
    memory: the branches for other platforms leave nothing behind), in one layer's gradient
    and in the real train step; splash compiles to its own three Mosaic kernels."""
    result = _result(tpu_aot, "auto_attention")
    layer, chosen = result["layer"], result["layer"][result["auto_tpu"]]
    assert layer["auto"] == chosen and len(chosen["kernels"]) == 3
    assert result["step_kernels"] == chosen["kernels"]
    assert [name.split("_")[2] for name in layer["splash"]["kernels"]] == ["dkv", "dq", "fwd"]
    assert all(name.startswith("splash_mha_") for name in layer["splash"]["kernels"])
