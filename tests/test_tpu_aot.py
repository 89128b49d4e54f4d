"""Ahead-of-time compilation for a TPU topology on this CPU machine (libtpu, no TPU): the real
train step (`describe --tpu-topology`), and the Pallas kernels compiled by Mosaic. Everything is
compiled once, in the one subprocess of the `tpu_aot` fixture (tests/tpu_aot_jobs.py)."""

from __future__ import annotations

import numpy as np

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



def _weight_collectives(run: dict, member: str, kind: str) -> list[dict]:
    """The `kind` collectives of `member`'s step whose arrays are weight matrices (whole, or
    one FSDP shard of one: a dimension divided by the 4 chips)."""
    matrices = [tuple(shape) for shape in run["param_shapes"] if len(shape) >= 2]

    def is_weight(shape):
        return any(len(shape) == len(whole) and all(
            dim in (full, full // 4) for dim, full in zip(shape, whole)) for whole in matrices)

    return [c for c in run["collectives"][member] if c["kind"] == kind
            and all(is_weight(tuple(shape)) for shape in c["shapes"])]


def test_describe_writes_each_members_hlo(tpu_aot):
    run = _result(tpu_aot, "describe_hlo_fsdp")
    assert run["code"] == 0
    assert run["files"] == ["decoder.hlo.txt", "encoder.hlo.txt"]
    for member in ("encoder", "decoder"):
        assert run["collectives"][member]  # HLO text a reader can parse
        summary = run["tpu"][member]["collectives"]
        assert sum(entry["count"] for entry in summary.values()) == len(
            run["collectives"][member])


def test_fsdp_reduce_scatters_gradients_inside_the_microbatch_loop(tpu_aot):
    """FSDP over 4 chips, 4 microbatches: every weight gradient is reduce-scattered into its
    shard inside the microbatch loop (one shard's bytes come back, and the accumulator is a
    shard); no weight gradient is all-reduced at full size there; weights travel in bf16."""
    run = _result(tpu_aot, "describe_hlo_fsdp")
    matrices = [shape for shape in run["param_shapes"] if len(shape) >= 2]
    for member in ("encoder", "decoder"):
        scatters = _weight_collectives(run, member, "reduce-scatter")
        assert all(c["in_loop"] and c["dtype"] == "f32" for c in scatters)
        assert len(scatters) >= len(matrices)
        full_size = [c for c in _weight_collectives(run, member, "all-reduce")
                     if c["in_loop"] and any(list(s) in matrices for s in c["shapes"])]
        assert not full_size, full_size
        gathers = _weight_collectives(run, member, "all-gather")
        assert len(gathers) >= len(matrices) and all(c["in_loop"] for c in gathers)
        assert {c["dtype"] for c in gathers} == {"bf16"}


def test_data_parallel_reduces_gradients_once_after_the_microbatch_loop(tpu_aot):
    """mesh.data=4, 4 microbatches: no collective inside the microbatch loop; the gradients
    (every parameter, fp32) are all-reduced after it, once."""
    run = _result(tpu_aot, "describe_hlo_dp")
    param_bytes = 4 * sum(int(np.prod(shape)) for shape in run["param_shapes"])
    for member in ("encoder", "decoder"):
        found = run["collectives"][member]
        assert not [c for c in found if c["in_loop"]]
        reduced = sum(c["bytes"] for c in found if c["kind"] == "all-reduce")
        assert param_bytes <= reduced < param_bytes + 1024  # + the loss sums, once


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
