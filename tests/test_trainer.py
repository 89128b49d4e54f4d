"""The trainer: equal losses on every mesh, FSDP memory, accumulation, non-finite steps, exact
resume after kill -9 and SIGTERM, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ByteTokenizer

from data_pipelines.pipeline import make_batch_iterator
from ettin_jax.config import load_recipe
from ettin_jax.config.schema import MeshConfig
from ettin_jax.errors import ConfigError
from ettin_jax.training.aot import abstract_step
from ettin_jax.training.mesh import batch_sharding, make_mesh
from ettin_jax.training.checkpoint import TrainCheckpointer
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.state import abstract_state, init_state, init_state_shardings, model_graph
from ettin_jax.training.step import make_train_step, sharded_train_step
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
SMALL = ["train.seq_len=64", "train.global_batch_size=8", "logging.every_steps=1",
         "model.num_layers=2"]  # small programs: 8-device SPMD compiles dominate on 2 cores


def _losses(recipe, objective, mesh, steps=3, microbatch_size=None, max_microbatch_size=None):
    """(losses, grad norms) of the first `steps` steps, and the final state."""
    optimizer = make_optimizer(recipe.optimizer)
    state, shardings = init_state(recipe.model, objective, optimizer, mesh, seed=recipe.train.seed)
    step = sharded_train_step(recipe.model, objective, optimizer, shardings, mesh,
                              seed=recipe.train.seed, learning_rate=2e-3,
                              microbatch_size=microbatch_size,
                              max_microbatch_size=max_microbatch_size,
                              mlm_mask_ratio=recipe.data.mlm_mask_ratio)
    batches = make_batch_iterator(recipe.data, seq_len=recipe.train.seq_len,
                                  global_batch_size=recipe.train.global_batch_size,
                                  seed=recipe.train.seed, objective=objective,
                                  tokenizer=ByteTokenizer())
    losses, grad_norms = [], []
    for _ in range(steps):
        batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
                 for k, v in next(batches).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return np.array([losses, grad_norms]), state


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_first_losses_equal_on_every_mesh(objective):
    """Losses and gradient norms (a missing or doubled reduction over devices changes the
    norm; Adam's updates, and so the losses, barely notice it)."""
    recipe = load_recipe(TINY, SMALL)
    single, _ = _losses(recipe, objective, make_mesh(MeshConfig(1, 1), jax.devices()[:1]))
    assert single[0, -1] < single[0, 0]  # it learns
    for data, fsdp in [(8, 1), (1, 8), (2, 4)]:
        sharded, state = _losses(recipe, objective, make_mesh(MeshConfig(data, fsdp)))
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
        kernel = state.params["layers"][1]["mlp"]["Wi"]["kernel"]
        assert kernel.sharding.spec[0] == "fsdp"  # the embed dimension, by the rules table
        assert len(kernel.sharding.device_set) == 8


@pytest.mark.parametrize("objective, mesh_shape, rows, microbatch, most", [
    ("clm", (1, 1), 8, 2, None),
    ("clm", (1, 1), 8, 2, 4),  # two microbatches of 4 rows, multiples of 2
    ("mlm", (2, 4), 16, 8, None),  # the sparse MLM head, packed per device, data x FSDP mesh
])
def test_gradient_accumulation_equals_the_full_batch(objective, mesh_shape, rows, microbatch,
                                                     most):
    recipe = load_recipe(TINY, SMALL + ["model.attention_output_dropout=0.0",
                                        f"train.global_batch_size={rows}"])
    devices = jax.devices()[:mesh_shape[0] * mesh_shape[1]]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    full, full_state = _losses(recipe, objective, mesh)
    accumulated, acc_state = _losses(recipe, objective, mesh, microbatch_size=microbatch,
                                     max_microbatch_size=most)
    np.testing.assert_allclose(accumulated, full, rtol=1e-5)
    np.testing.assert_allclose(acc_state.params["head"]["dense"]["kernel"],
                               full_state.params["head"]["dense"]["kernel"], rtol=1e-4, atol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights_and_loss():
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    full, _ = _losses(load_recipe(TINY, SMALL), "mlm", mesh)
    half, state = _losses(load_recipe(TINY, SMALL + ["model.dtype=bfloat16"]), "mlm", mesh)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.opt_state)
               if leaf.ndim)
    np.testing.assert_allclose(half, full, rtol=2e-2)  # bf16 rounding, same training
    assert not np.array_equal(half, full)  # the compute really ran in bf16


def test_fsdp_shards_parameters_and_optimizer_state():
    """Bytes of parameters and optimizer moments on one device, from the train state's
    shardings (what `init_state` and checkpoint restores place arrays on)."""
    recipe = load_recipe(TINY)
    optimizer = make_optimizer(recipe.optimizer)

    def bytes_on_first_device(fsdp):
        mesh = make_mesh(MeshConfig(1, fsdp), jax.devices()[:fsdp])
        shardings = init_state_shardings(recipe.model, "mlm", optimizer, mesh)
        state = abstract_state(shardings, recipe.model, "mlm", optimizer)
        return sum(np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves((state.params, state.opt_state)))

    single = bytes_on_first_device(1)
    for n in (2, 4, 8):
        # Norm scales and the decoder bias stay replicated: a small share of the total.
        assert bytes_on_first_device(n) == pytest.approx(single / n, rel=0.10)


def test_fsdp_gathers_weights_not_activations():
    """Per-device temporaries of the compiled step under FSDP over 8 devices stay those of 8-way
    data parallelism at the same rows per device (left alone, XLA gathers the whole batch's
    activations onto every device instead of the weights: about twice the bytes here, the
    device count times at pod scale)."""
    recipe = load_recipe(TINY, ["model.num_layers=2", "train.seq_len=128"])
    optimizer = make_optimizer(recipe.optimizer)

    def temp_bytes(mesh):
        shardings = init_state_shardings(recipe.model, "clm", optimizer, mesh)
        state = abstract_state(shardings, recipe.model, "clm", optimizer)
        batch = {key: jax.ShapeDtypeStruct((64, 128), np.int32, sharding=batch_sharding(mesh))
                 for key in ("input_ids", "segment_ids", "positions", "labels")}
        step = sharded_train_step(recipe.model, "clm", optimizer, shardings, mesh,
                                  seed=0, learning_rate=1e-3)
        compiled = step.lower(state, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(make_mesh(MeshConfig(1, 8))) < 1.15 * temp_bytes(make_mesh(MeshConfig(8, 1)))


def test_non_finite_updates_are_skipped_and_counted():
    recipe = load_recipe(TINY, SMALL)
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    optimizer = make_optimizer(recipe.optimizer)
    state, shardings = init_state(recipe.model, "clm", optimizer, mesh, seed=1)
    params = jax.tree.map(np.array, state.params)
    params["final_norm"]["scale"][0] = np.nan
    state = state.replace(params=jax.device_put(params, shardings.params))
    step = jax.jit(make_train_step(model_graph(recipe.model, "clm"), optimizer, seed=1,
                                   learning_rate=1e-3))
    batch = next(make_batch_iterator(recipe.data, seq_len=64, global_batch_size=8, seed=1,
                                     objective="clm", tokenizer=ByteTokenizer()))
    for expected_streak in (1, 2):
        state, metrics = step(state, batch)
        assert float(metrics["finite"]) == 0 and int(metrics["nonfinite_streak"]) == expected_streak
    assert int(state.skipped) == 2 and int(state.step) == 2
    np.testing.assert_array_equal(state.params["head"]["dense"]["kernel"],
                                  params["head"]["dense"]["kernel"])


def test_mlm_packing_overflow_skips_the_update_and_stops_the_run(tmp_path, monkeypatch):
    import ettin_jax.training.losses as losses_module
    from ettin_jax.training.trainer import train_member

    recipe = load_recipe(TINY, SMALL)
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    optimizer = make_optimizer(recipe.optimizer)
    state, shardings = init_state(recipe.model, "mlm", optimizer, mesh, seed=3)
    batch = next(make_batch_iterator(recipe.data, seq_len=64, global_batch_size=8, seed=3,
                                     objective="mlm", tokenizer=ByteTokenizer()))
    masked = int(np.sum(batch["labels"] != -100))
    # All masked tokens fit at ratio 0.3; at 0.05 they cannot.
    for ratio, lost in [(0.3, 0), (0.05, masked - losses_module.capacity_for(8, 64, 0.05))]:
        step = sharded_train_step(recipe.model, "mlm", optimizer, shardings, mesh,
                                  seed=3, learning_rate=1e-3, mlm_mask_ratio=ratio)
        before = np.asarray(state.params["head"]["dense"]["kernel"])
        state, metrics = step(state, batch)
        assert int(metrics["mlm_overflow"]) == lost > -1
        changed = not np.array_equal(before, state.params["head"]["dense"]["kernel"])
        assert changed == (lost == 0) and int(metrics["skipped"]) == (lost > 0)
    # The run saves and stops with the reason; the CLI exits 3 on it.
    monkeypatch.setattr(losses_module, "capacity_for", lambda *args: 1)
    result = train_member(recipe, "mlm", tmp_path / "encoder", tokenizer=ByteTokenizer())
    assert result.failed and result.step == 1
    assert "did not fit the MLM head's packing capacity" in result.stopped
    assert TrainCheckpointer(tmp_path / "encoder", recipe.checkpoint).latest_step() == 1


def test_bad_mesh_batch_and_run_dir(tmp_path, tokenizer_dir):
    from data_pipelines.sources import MissingInputError
    from ettin_jax.training.preflight import check_recipe_inputs

    with pytest.raises(ConfigError, match=r"mesh.data=3 x mesh.fsdp=1 = 3 devices, but 8"):
        make_mesh(MeshConfig(3, 1))
    with pytest.raises(ConfigError, match="cannot be split"):
        make_mesh(MeshConfig(-1, 3))
    recipe = load_recipe(TINY, ["train.global_batch_size=4"])
    mesh = make_mesh(recipe.mesh)
    with pytest.raises(ConfigError, match="4 rows must split over the 8 devices"):
        check_recipe_inputs(recipe, mesh, ByteTokenizer())
    # A later phase is checked before the first one trains.
    late = load_recipe(TINY, ["phases=[{name: a}, {name: b, train: {global_batch_size: 12}}]"])
    with pytest.raises(ConfigError, match=r"phases.1.train.global_batch_size=12 .* 12 rows"):
        check_recipe_inputs(late, mesh, ByteTokenizer())
    gone = tmp_path / "gone"
    missing = load_recipe(TINY, [f"phases=[{{name: a}}, {{name: b, data: {{sources: "
                                 f"[{{path: {gone}, kind: prepared}}]}}}}]"])
    with pytest.raises(MissingInputError, match=rf"phases.1.data.sources.0: prepared data "
                                                rf"{gone} does not exist; prepare it with "
                                                rf"`ettin-jax data prepare .* --out {gone}`"):
        check_recipe_inputs(missing, mesh, ByteTokenizer())
    # A run directory whose checkpoints another recipe wrote is refused before training.
    (tmp_path / "recipe.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "encoder" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a run of another recipe"):
        train_pair(load_recipe(TINY, [f"data.tokenizer={tokenizer_dir}"]), tmp_path)


# --- end to end, in subprocesses: the CLI as users run it ----------------------------------------


def _train_command(run_dir, tokenizer_dir, *extra):
    # Two phases: 5 steps with batch-size warmup from 2 to 8 rows (checkpoints fall in the middle
    # of full batches too), then 10 steps at a longer sequence, 15% masking and a restarted
    # schedule. Kills land in either phase.
    phases = ("phases=[{name: a, kind: pretrain, train: {steps: 5}},"
              " {name: b, kind: decay, train: {steps: 10, seq_len: 96, batch_warmup_tokens: 0},"
              "  data: {mlm_mask_ratio: 0.15}, schedule: {start: 0.5, decay_tokens: null}}]")
    return [sys.executable, "-m", "ettin_jax", "train", str(TINY), *SMALL, phases,
            "checkpoint.every_steps=3", "train.microbatch_size=2",
            "train.batch_warmup_tokens=600", f"data.tokenizer={tokenizer_dir}", *extra,
            "--run-dir", str(run_dir), "--only", "encoder", "--cpu-devices", "2"]


def _wait_for_step(member_dir: Path, step: int, process, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in read_metrics(member_dir)):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError(f"step {step} never came")


def _subprocess_env() -> dict[str, str]:
    """The environment of a `ettin-jax train` subprocess: CPU, the tests' compilation cache
    and LLVM optimisation level (conftest), and the device count its --cpu-devices sets."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    return env


def test_kill_9_and_sigterm_then_resume_is_bit_identical(tokenizer_dir, tmp_path):
    env = _subprocess_env()
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference, tokenizer_dir), env=env, check=True,
                   capture_output=True)
    records = read_metrics(reference / "encoder")
    expected = {r["step"]: r["loss"] for r in records}
    assert sorted(expected) == list(range(1, 16))
    assert [r["phase"] for r in records] == ["a"] * 5 + ["b"] * 10
    rows = [r["batch_rows"] for r in records]
    assert rows == sorted(rows) and rows[0] == 2 and rows[4] == 8 and len(set(rows)) >= 3

    run = tmp_path / "run"
    process = subprocess.Popen(_train_command(run, tokenizer_dir), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run / "encoder", 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(r["step"] for r in read_metrics(run / "encoder"))
    # Same command again: resumes from the last complete checkpoint (a multiple of 3 or the end
    # of phase a). SIGTERM goes once this process has written a step the killed one never did,
    # and well before the last step, so it lands mid-run.
    assert killed_at + 1 <= 10, killed_at
    process = subprocess.Popen(_train_command(run, tokenizer_dir), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run / "encoder", killed_at + 1, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert b"preempted (SIGTERM)" in out
    subprocess.run(_train_command(run, tokenizer_dir), env=env, check=True, capture_output=True)
    resumed = {r["step"]: r["loss"] for r in read_metrics(run / "encoder")}
    assert resumed == expected  # every step once, each loss bit-identical


def _read_events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing, Event protos), read by hand."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in directory.glob("events.out.tfevents.*"):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_run_writes_metrics_events_eval_and_restores_on_other_meshes(tmp_path):
    from ettin_jax.training.state import abstract_state

    recipe = load_recipe(TINY, SMALL + [
        "train.steps=4", "checkpoint.every_steps=2", "logging.tensorboard=true",
        "logging.eval_every_steps=2", "logging.eval_batches=1", "mesh.data=2", "mesh.fsdp=4",
        "train.objectives=[clm]"])
    from ettin_jax.training.trainer import train_member

    result = train_member(recipe, "clm", tmp_path / "decoder", tokenizer=ByteTokenizer())
    assert (result.step, result.stopped) == (4, None)
    records = read_metrics(tmp_path / "decoder")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["eval_perplexity"] < 1e4 for r in records if r["step"] % 2 == 0)
    events = _read_events(tmp_path / "decoder" / "events")
    assert [step for step, _ in events["loss"]] == [1, 2, 3, 4]
    assert events["loss"][-1][1] == pytest.approx(records[-1]["loss"])

    # The (2, 4) checkpoint restores onto other meshes with identical values.
    optimizer = make_optimizer(recipe.optimizer)
    checkpoints = TrainCheckpointer(tmp_path / "decoder", recipe.checkpoint)
    restored = {}
    for name, mesh in {"(8,1)": make_mesh(MeshConfig(8, 1)),
                       "1 device": make_mesh(MeshConfig(1, 1), jax.devices()[:1])}.items():
        _, shardings = init_state(recipe.model, "clm", optimizer, mesh, seed=0)
        target = abstract_state(shardings, recipe.model, "clm", optimizer)
        state, progress, saved_recipe = checkpoints.restore(4, target)
        restored[name] = jax.tree.map(np.asarray, state.params)
        assert int(state.step) == 4 and progress["tokens"] == records[-1]["tokens"]
        assert saved_recipe["train"]["steps"] == 4
    checkpoints.close()
    for a, b in zip(jax.tree.leaves(restored["(8,1)"]), jax.tree.leaves(restored["1 device"])):
        np.testing.assert_array_equal(a, b)


def test_weights_only_start_from_the_other_member(tmp_path):
    from flax import nnx

    from ettin_jax.models import EttinModel
    from ettin_jax.training.checkpoint import save_weights
    from ettin_jax.training.resume import _initial_params

    recipe = load_recipe(TINY, SMALL)
    encoder = EttinModel(recipe.model, "mlm", rngs=nnx.Rngs(5))
    save_weights(tmp_path / "encoder", encoder, special_tokens=ByteTokenizer().special_tokens)
    cross = load_recipe(TINY, SMALL + [f"checkpoint.init_from={tmp_path / 'encoder'}"])
    params = _initial_params(cross, "clm")
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    state, _ = init_state(cross.model, "clm", make_optimizer(cross.optimizer), mesh, seed=0,
                          params=params)
    expected = nnx.to_pure_dict(nnx.state(encoder))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 0  # a fresh optimizer
    other = load_recipe(TINY, SMALL + ["model.num_layers=3",
                                       f"checkpoint.init_from={tmp_path / 'encoder'}"])
    with pytest.raises(Exception, match="another architecture"):
        _initial_params(other, "clm")


def test_a_token_budget_ends_the_run_and_spans_the_schedule(tmp_path):
    from ettin_jax.training.trainer import train_member

    budget, floor = 2000, 0.1
    recipe = load_recipe(TINY, SMALL + [
        "train.steps=null", f"train.tokens={budget}",
        "schedule.warmup_tokens=0", "schedule.decay=linear", f"schedule.decay_tokens={budget}",
        f"schedule.floor={floor}"])
    result = train_member(recipe, "clm", tmp_path / "decoder", tokenizer=ByteTokenizer())
    records = read_metrics(tmp_path / "decoder")
    assert result.tokens == records[-1]["tokens"] >= budget > records[-2]["tokens"]
    peak = recipe.optimizer.learning_rate
    # Each step's rate is set by the tokens before it.
    seen = [0] + [r["tokens"] for r in records[:-1]]
    for before, record in zip(seen, records):
        assert record["learning_rate"] == pytest.approx(
            peak * (floor + (1 - floor) * (1 - before / budget)), rel=1e-5)


def test_resuming_another_model_shape_is_refused(tmp_path):
    from ettin_jax.errors import CheckpointError
    from ettin_jax.training.trainer import train_member

    recipe = load_recipe(TINY, SMALL + ["train.steps=1", "mesh.data=1", "mesh.fsdp=8"])
    train_member(recipe, "mlm", tmp_path / "encoder", tokenizer=ByteTokenizer())
    wider = load_recipe(TINY, SMALL + ["train.steps=2", "model.intermediate_size=256"])
    with pytest.raises(CheckpointError, match=r"intermediate_size 192 \(want 256\)"):
        train_member(wider, "mlm", tmp_path / "encoder", tokenizer=ByteTokenizer())
    with pytest.raises(CheckpointError, match="holds a mlm model, this run trains clm"):
        train_member(recipe, "clm", tmp_path / "encoder", tokenizer=ByteTokenizer())


# orbax leaves the reads of the damaged file's other arrays unawaited when one read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_latest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, capsys):
    """A storage fault truncates a data file of the newest checkpoint: `export` names it, and
    the same training command sets it aside (never deletes it) and resumes from the newest
    readable checkpoint with the losses of an uninterrupted run."""
    from ettin_jax.errors import CheckpointError
    from ettin_jax.training.checkpoint import restore_weights
    from ettin_jax.training.trainer import train_member

    recipe = load_recipe(TINY, SMALL + ["train.steps=6", "checkpoint.every_steps=2",
                                        "mesh.data=-1"])
    member = tmp_path / "decoder"
    train_member(recipe, "clm", member, tokenizer=ByteTokenizer())
    expected = {r["step"]: r["loss"] for r in read_metrics(member)}
    data_files = sorted((member / "checkpoints" / "6" / "params").rglob("d/*"),
                        key=lambda p: p.stat().st_size)
    damaged = data_files[-1]
    damaged.write_bytes(damaged.read_bytes()[:100])

    with pytest.raises(CheckpointError, match=r"checkpoints/6 cannot be read .*another step "
                                              r"\(4\)"):
        restore_weights(member)
    capsys.readouterr()
    result = train_member(recipe, "clm", member, tokenizer=ByteTokenizer())
    err = capsys.readouterr().err
    aside = member / "unreadable-checkpoints" / "6"
    assert "decoder: checkpoint 6 cannot be read (" in err and f"set aside as {aside}" in err
    assert "decoder: resuming from checkpoint 4, the newest readable one" in err
    assert (aside / "params" / damaged.relative_to(member / "checkpoints" / "6" / "params")
            ).stat().st_size == 100  # kept as it was found
    assert (result.step, result.stopped) == (6, None)
    assert {r["step"]: r["loss"] for r in read_metrics(member)} == expected
    assert restore_weights(member).step == 6  # the retrained step, readable


def test_training_without_heldout_data_says_so(tmp_path, tokenizer_dir, capsys):
    recipe = load_recipe(TINY, SMALL + ["train.steps=2", "data.heldout=[]",
                                        "logging.eval_every_steps=1", "train.objectives=[clm]",
                                        f"data.tokenizer={tokenizer_dir}"])
    results = train_pair(recipe, tmp_path)
    assert results["decoder"].step == 2
    assert ("data.heldout is empty: training without held-out evaluation (phase main; "
            "logging.eval_every_steps=1 is ignored there)") in capsys.readouterr().err
    assert not any("eval_loss" in r for r in read_metrics(tmp_path / "decoder"))


def test_dropout_masks_do_not_depend_on_microbatches_or_mesh():
    """Dropout keys come from the row of the step's batch: with dropout on, accumulating 2
    microbatches on a data x FSDP mesh gives the full-batch losses and gradient norms of one
    device (rows are reduced in another order: rtol 1e-5)."""
    recipe = load_recipe(TINY, SMALL + ["train.global_batch_size=16"])
    assert recipe.model.attention_output_dropout > 0
    single, _ = _losses(recipe, "clm", make_mesh(MeshConfig(1, 1), jax.devices()[:1]), steps=2)
    accumulated, _ = _losses(recipe, "clm", make_mesh(MeshConfig(2, 4)), steps=2,
                             microbatch_size=8)
    np.testing.assert_allclose(accumulated, single, rtol=1e-5)


def _scan_lengths(jaxpr) -> list[int]:
    """Lengths of every lax.scan in a (closed) jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
        for param in eqn.params.values():
            for inner in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _scan_lengths(inner)
    return found


@pytest.mark.parametrize("most, loop", [(None, [4]), (4, [2]), (6, [2]), (8, [])])
def test_the_step_runs_the_fewest_microbatches_under_max_microbatch_size(most, loop):
    recipe = load_recipe(TINY, SMALL + ["train.microbatch_size=2",
                                        f"train.max_microbatch_size={most or 'null'}"])
    step, state, batch = abstract_step(recipe, "clm", make_mesh(MeshConfig(1, 2),
                                                                jax.devices()[:2]))
    assert batch["input_ids"].shape == (8, 64)
    assert _scan_lengths(jax.make_jaxpr(step)(state, batch).jaxpr) == loop
