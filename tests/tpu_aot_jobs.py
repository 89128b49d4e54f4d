"""Every TPU ahead-of-time compilation the tests check, in one process (the `tpu_aot` fixture of
conftest.py runs it once per test session): libtpu loads once, and stays out of the test
process. No TPU is used.

    python tests/tpu_aot_jobs.py OUT.json

writes {job: {"result": ..., "stderr": what the job printed to stderr (C++ included)} or
{"error": traceback, "stderr": ...}} for every job below; the tests assert on the results.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5p:2x2x1"
# The tiny recipe on a 4-chip slice, FSDP over all four chips.
DESCRIBE = ["describe", str(ROOT / "recipes" / "tiny.yaml"), "mesh.data=-1", "mesh.fsdp=4",
            "train.global_batch_size=16", "--tpu-topology", TOPOLOGY, "--json"]


def describe(*overrides: str) -> dict:
    """`ettin-jax describe ... --tpu-topology v5p:2x2x1 --json` as a user runs it: its exit
    code and the "tpu" part of its JSON."""
    from ettin_jax.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*DESCRIBE, *overrides])
    return {"code": code, "tpu": json.loads(out.getvalue())["tpu"] if code == 0 else None}


def unknown_topology() -> dict:
    """`ettin-jax describe tiny --tpu-topology v99:1x1`: exit code and error line."""
    from ettin_jax.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["describe", "tiny", "--tpu-topology", "v99:1x1"])
    return {"code": code, "stderr": err.getvalue()}


def _tpu_device():
    from ettin_jax.training.aot import topology_devices

    return topology_devices(TOPOLOGY)[0]


def flash_attention_kernels() -> list[int]:
    """Custom calls in the compiled gradient of flash attention on one TPU chip, for each
    (shape, dtype) x (global, causal local, bidirectional local): Mosaic kernels for the
    forward pass and both backward passes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from pallas_kernels.flash_attention import flash_attention

    on_tpu = SingleDeviceSharding(_tpu_device())
    counts = []
    for seq, head_dim, dtype in [(1024, 64, jnp.bfloat16), (999, 128, jnp.float32)]:
        args = [jax.ShapeDtypeStruct((2, seq, 4, head_dim), dtype, sharding=on_tpu)] * 3
        args.append(jax.ShapeDtypeStruct((2, seq), jnp.int32, sharding=on_tpu))
        for causal, window in [(False, None), (True, (63, 0)), (False, (64, 64))]:
            def loss(q, k, v, segments, causal=causal, window=window):
                out = flash_attention(q, k, v, causal=causal, window=window,
                                      segment_ids=segments)
                return jnp.sum(out.astype(jnp.float32))

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
            counts.append(compiled.as_text().count("tpu_custom_call"))
    return counts


def masked_packing_kernels() -> list[int]:
    """Custom calls in the compiled gradient of pack -> unpack on one TPU chip, fp32 and bf16."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from pallas_kernels.masked_packing import pack_masked_tokens, unpack_masked_tokens

    on_tpu = SingleDeviceSharding(_tpu_device())

    def loss(x, mask, scale):
        packed = pack_masked_tokens(x, mask, 37)  # lowering for TPU picks the Mosaic kernel
        y = unpack_masked_tokens(packed.values * scale, packed.indices, packed.valid, x.shape)
        return jnp.sum((y * x).astype(jnp.float32))

    counts = []
    for dtype in (jnp.float32, jnp.bfloat16):
        args = (jax.ShapeDtypeStruct((3, 29, 96), dtype, sharding=on_tpu),
                jax.ShapeDtypeStruct((3, 29), jnp.bool_, sharding=on_tpu),
                jax.ShapeDtypeStruct((), dtype, sharding=on_tpu))
        counts.append(jax.jit(jax.grad(loss)).trace(*args).lower().compile().as_text()
                      .count("tpu_custom_call"))
    return counts


def pallas_train_step() -> dict:
    """The encoder's real train step with flash attention on the 4-chip slice under FSDP:
    the model's graph is the same as on any mesh; the kernels find the mesh when the step is
    traced and run per chip. Custom calls and collectives of the compiled step."""
    from ettin_jax.config import load_recipe
    from ettin_jax.training.aot import abstract_step, topology_devices
    from ettin_jax.training.mesh import make_mesh

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", DESCRIBE[2:5] + [
        "model.attention_impl=pallas", "train.seq_len=256", "train.global_batch_size=16",
        "train.microbatch_size=null", "train.max_microbatch_size=null",
        "train.batch_warmup_tokens=0", "data.mlm_mask_ratio=0.3"])
    step, state, batch = abstract_step(recipe, "mlm", make_mesh(recipe.mesh,
                                                                topology_devices(TOPOLOGY)))
    assert batch["input_ids"].shape == (16, 256)
    text = step.lower(state, batch).compile().as_text()
    return {"custom_calls": text.count("tpu_custom_call"), "layers": recipe.model.num_layers}


def describe_hlo(*overrides: str) -> dict:
    """`ettin-jax describe tiny ... --tpu-topology v5p:2x2x1 --hlo DIR --json` with bf16
    compute and 4 microbatches of 1 row per chip (FSDP over all four chips unless `overrides`
    say otherwise): its exit code, the files written to DIR, the "tpu" report, each member's
    collectives as `ettin_jax.training.hlo` reads them from its HLO file, and the parameter
    shapes."""
    import dataclasses

    import jax
    from flax import nnx

    from ettin_jax.config import load_recipe
    from ettin_jax.models import EttinModel
    from ettin_jax.training.hlo import collectives

    settings = ["model.dtype=bfloat16", "train.microbatch_size=4", *overrides]
    with tempfile.TemporaryDirectory() as hlo:
        described = describe(*settings, "--hlo", hlo)
        files = sorted(os.listdir(hlo))
        found = {path.name.split(".")[0]: [dataclasses.asdict(c) for c in collectives(
            path.read_text())] for path in Path(hlo).glob("*.hlo.txt")}
    config = load_recipe(ROOT / "recipes" / "tiny.yaml", DESCRIBE[2:5] + settings).model
    shapes = [list(leaf.shape) for leaf in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: EttinModel(config, "clm", rngs=nnx.Rngs(0))), nnx.Param))]
    return {**described, "files": files, "collectives": found, "param_shapes": shapes}


def _mosaic_kernels(hlo_text: str) -> list[str]:
    """Names of the attention kernels among the Mosaic calls of compiled HLO (from each call's
    op_name): our flash attention's (ettin_flash_attention_*) and splash's (splash_*)."""
    import re

    calls = [line for line in hlo_text.splitlines() if 'target="tpu_custom_call"' in line]
    return sorted({name for line in calls for name in re.findall(
        r"(ettin_flash_attention_[a-z]+|splash_m[hq]a_[a-z_]+)", line)})


def auto_attention() -> dict:
    """attention_impl "auto" compiled for TPU: the Mosaic kernels and temporary bytes of one
    attention layer's gradient (Ettin's causal local window, packed rows) under "auto", "pallas"
    and "splash", and the Mosaic kernels of the real FSDP train step under "auto"."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from ettin_jax.config import load_recipe
    from ettin_jax.models.attention import AUTO, dot_product_attention
    from ettin_jax.training.aot import topology_devices
    from ettin_jax.training.mesh import batch_sharding, make_mesh
    from ettin_jax.training.optimizer import make_optimizer
    from ettin_jax.training.state import abstract_state, init_state_shardings
    from ettin_jax.training.step import sharded_train_step

    on_tpu = SingleDeviceSharding(_tpu_device())
    args = [jax.ShapeDtypeStruct((2, 1024, 4, 64), jnp.bfloat16, sharding=on_tpu)] * 3
    args.append(jax.ShapeDtypeStruct((2, 1024), jnp.int32, sharding=on_tpu))
    layers = {}
    for impl in ("auto", "pallas", "splash"):
        def loss(q, k, v, segments, impl=impl):
            out = dot_product_attention(q, k, v, segments, causal=True, window=(63, 0),
                                        impl=impl)
            return jnp.sum(out.astype(jnp.float32))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
        layers[impl] = {"kernels": _mosaic_kernels(compiled.as_text()),
                        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", DESCRIBE[2:5] + [
        "model.attention_impl=auto", "train.seq_len=256"])
    mesh = make_mesh(recipe.mesh, topology_devices(TOPOLOGY))
    optimizer = make_optimizer(recipe.optimizer)
    shardings = init_state_shardings(recipe.model, "clm", optimizer, mesh)
    state = abstract_state(shardings, recipe.model, "clm", optimizer)
    batch = {k: jax.ShapeDtypeStruct((16, 256), jnp.int32, sharding=batch_sharding(mesh))
             for k in ("input_ids", "segment_ids", "positions", "labels")}
    step = sharded_train_step(recipe.model, "clm", optimizer, shardings, mesh, seed=0,
                              learning_rate=1e-3)
    text = step.lower(state, batch).compile().as_text()
    return {"auto_tpu": AUTO["tpu"], "layer": layers, "step_kernels": _mosaic_kernels(text)}


JOBS = {
    "describe_seq128": lambda: describe("train.seq_len=128"),
    "describe_seq256": lambda: describe("train.seq_len=256"),
    "unknown_topology": unknown_topology,
    "flash_attention_kernels": flash_attention_kernels,
    "masked_packing_kernels": masked_packing_kernels,
    "pallas_train_step": pallas_train_step,
    "auto_attention": auto_attention,
    "describe_hlo_fsdp": describe_hlo,
    "describe_hlo_dp": lambda: describe_hlo("mesh.data=4", "mesh.fsdp=1"),
}


@contextlib.contextmanager
def _captured_stderr(sink: dict):
    """Everything written to file descriptor 2 inside the block (libtpu's C++ logging too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sink["stderr"] = capture.read().decode("utf-8", errors="replace")


def main(out: str) -> None:
    results = {}
    for name, job in JOBS.items():
        entry: dict = {}
        with _captured_stderr(entry):
            try:
                entry["result"] = job()
            except Exception:  # noqa: BLE001 - reported to the test that needs this job
                entry["error"] = traceback.format_exc()
        results[name] = entry
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
