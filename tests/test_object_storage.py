"""Run directories, prepared data, tokenizers and exports in object storage, against real
servers on loopback (tests/object_stores.py): fake-gcs-server for gs://, moto for s3://."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from object_stores import BUCKET, GcsServer, S3Server, restore_environment, set_environment

from ettin_jax import storage
from ettin_jax.cli import main
from ettin_jax.config import load_recipe
from ettin_jax.hf.pretrained import from_pretrained
from ettin_jax.hf.transfer import export_checkpoint, import_pretrained
from ettin_jax.plotting import plot_run
from ettin_jax.training.checkpoint import CHECKPOINTS, restore_weights
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# Small programs, a checkpoint every 2 steps, a record every step, TensorBoard on.
SMALL = ["train.seq_len=64", "model.num_layers=2", "logging.every_steps=1",
         "checkpoint.every_steps=2", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def servers():
    """Both servers, their variables set in this process for the module's tests."""
    with GcsServer() as gcs, S3Server() as s3:
        before = set_environment({**gcs.env, **s3.env})
        try:
            yield {"gs": gcs, "s3": s3}
        finally:
            restore_environment(before)


def _params(restored) -> dict:
    return nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))


def _assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = (dict(nnx.traversals.flatten_mapping(x)) for x in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_train_export_and_import_in_a_bucket(servers, scheme, tokenizer_dir, tmp_path):
    run = f"{scheme}://{BUCKET}/runs/{tmp_path.name}"
    tokenizer = f"{scheme}://{BUCKET}/tokenizers/{tmp_path.name}"
    storage.upload_tree(tokenizer_dir, tokenizer)
    recipe = load_recipe(RECIPE, [*SMALL, "train.steps=4", f"data.tokenizer={tokenizer}",
                                  "train.objectives=[mlm]"])
    train_pair(recipe, run)
    encoder = storage.path(run) / "encoder"
    assert ocp.path.step.checkpoint_steps(encoder / CHECKPOINTS) == [2, 4]
    assert (storage.path(run) / "recipe.yaml").is_file()
    assert [r["step"] for r in read_metrics(encoder)] == [1, 2, 3, 4]
    assert list((encoder / "events").glob("events.out.tfevents.*"))
    assert load_recipe(storage.path(run) / "recipe.yaml") == recipe
    plot = plot_run(run)
    assert str(plot.path) == f"{run}/plots/training.png" and plot.records["encoder"] == 4
    assert storage.path(plot.path).read_bytes().startswith(b"\x89PNG")

    restored = restore_weights(encoder)
    assert restored.step == 4 and str(restored.tokenizer_dir).startswith(f"{scheme}://")
    # Export from the bucket into it, import back from it into the other store.
    report = export_checkpoint(run)["encoder"]
    assert str(report.path) == f"{run}/encoder/hf"
    assert (storage.path(report.path) / "model.safetensors").is_file()
    other = "s3" if scheme == "gs" else "gs"
    imported = import_pretrained(report.path, f"{other}://{BUCKET}/imported/{tmp_path.name}")
    _assert_same_params(_params(restore_weights(imported)), _params(restored))
    _assert_same_params(_params(from_pretrained(report.path)), _params(restored))
    # A run starts from the weights in the bucket (checkpoint.init_from).
    from ettin_jax.training.resume import _initial_params

    follow = load_recipe(RECIPE, [*SMALL, f"data.tokenizer={tokenizer}",
                                  f"checkpoint.init_from={imported}"])
    _assert_same_params(_initial_params(follow, "mlm"), _params(restored))
    # transformers reads a local download of the export.
    with storage.local_copy(report.path) as local:
        from transformers import AutoModelForMaskedLM

        assert AutoModelForMaskedLM.from_pretrained(local).config.num_hidden_layers == 2


def _complete_steps(member_dir: str) -> list[int]:
    return ocp.path.step.checkpoint_steps(storage.path(member_dir) / CHECKPOINTS)


def _train_command(run_dir: str, data: str, tokenizer: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "ettin_jax", "train", str(RECIPE), *SMALL,
            "logging.tensorboard=false", "checkpoint.every_steps=4", f"train.steps={steps}",
            f"data.tokenizer={tokenizer}", f"data.sources=[{{path: {data}}}]",
            "--run-dir", run_dir, "--only", "encoder"]


def _wait_for_checkpoint(member_dir: str, after: int, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [s for s in _complete_steps(member_dir) if s > after]
        if steps:
            return max(steps)
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)  # each look lists the bucket: leave the 2 cores to the training
    raise AssertionError(f"no checkpoint after step {after} in {member_dir}")


def test_prepare_kill_9_failing_store_and_resume_in_gcs(servers, tokenizer_dir, tmp_path):
    """Data prepared into a bucket equals a local preparation byte for byte and trains; a run
    in a gs:// run dir killed with -9, then refused by the store mid-run (clear error, earlier
    checkpoints intact), resumes to the losses of an uninterrupted run, every step once."""
    from object_stores import FaultyProxy

    data = f"gs://{BUCKET}/data/{tmp_path.name}"
    prepare = ["data", "prepare", "bundled", "--tokenizer", str(tokenizer_dir),
               "--workers", "1", "--documents-per-shard", "64"]
    assert main([*prepare, "--out", data]) == 0
    assert main([*prepare, "--out", str(tmp_path / "data")]) == 0
    local_files = sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file())
    for file in local_files:
        relative = file.relative_to(tmp_path / "data").as_posix()
        assert (storage.path(data) / relative).read_bytes() == file.read_bytes(), relative
    assert main([*prepare, "--out", data]) == 0  # finished: the same command does nothing
    # Read from the bucket (each shard fetched on first use) in a random order: the documents.
    from data_pipelines.prepare import open_prepared

    (remote, count), (local, local_count) = (open_prepared(where, None)
                                             for where in (data, tmp_path / "data"))
    assert count == local_count > 100
    for index in np.random.default_rng(count).permutation(count):
        np.testing.assert_array_equal(remote[int(index)], local[int(index)])

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    steps = 16
    reference = tmp_path / "reference"
    subprocess.run(_train_command(str(reference), data, str(tokenizer_dir), steps), env=env,
                   check=True, capture_output=True)
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "encoder")}
    assert sorted(expected) == list(range(1, steps + 1))

    run = f"gs://{BUCKET}/runs/{tmp_path.name}"
    command = _train_command(run, data, str(tokenizer_dir), steps)
    with FaultyProxy(servers["gs"].url) as proxy:
        env["STORAGE_EMULATOR_HOST"] = proxy.url
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        killed_after = _wait_for_checkpoint(f"{run}/encoder", 0, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert killed_after < steps

        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        resumed_after = _wait_for_checkpoint(f"{run}/encoder", killed_after, process)
        proxy.failing = True  # the store refuses every request from now on
        _, err = process.communicate(timeout=240)
        proxy.failing = False
        message = err.decode().strip().splitlines()[-1]
        assert process.returncode == 2, err.decode()[-3000:]
        assert message.startswith("ettin-jax train: error: "), message
        assert "could not be written" in message and run in message, message
        complete = _complete_steps(f"{run}/encoder")
        assert resumed_after in complete and max(complete) < steps
        assert restore_weights(f"{run}/encoder").step == max(complete)

        subprocess.run(command, env=env, check=True, capture_output=True)
    resumed = {r["step"]: r["loss"] for r in read_metrics(f"{run}/encoder")}
    assert resumed == expected  # every step once, each loss bit-identical


def test_beam_prepares_from_a_bucket_into_a_bucket(servers, tokenizer_dir, tmp_path, rng):
    """What Dataflow workers do: read the sources' files from a bucket (a glob) and write the
    shards into one; the same bytes as the local runner reading the same files."""
    inputs = f"gs://{BUCKET}/inputs/{tmp_path.name}"
    for name in ("a", "b", "c"):
        lines = [f'{{"text": "{name} {" ".join(map(str, rng.integers(0, 999, 40)))}"}}'
                 for _ in range(int(rng.integers(3, 9)))]
        (storage.path(inputs) / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (storage.path(inputs) / "skipped.txt").write_text("not matched by the glob")
    prepare = ["data", "prepare", f"{inputs}/*.jsonl", "--tokenizer", str(tokenizer_dir),
               "--workers", "2", "--documents-per-shard", "4"]
    beam_out = f"gs://{BUCKET}/data/{tmp_path.name}"
    assert main([*prepare, "--out", beam_out, "--runner", "beam"]) == 0  # 2 worker processes
    assert main([*prepare, "--out", str(tmp_path / "local")]) == 0
    local_files = sorted(p for p in (tmp_path / "local").glob("*") if p.is_file())
    assert len(local_files) > 3
    for file in local_files:
        assert (storage.path(beam_out) / file.name).read_bytes() == file.read_bytes(), file.name


def test_clients_follow_the_endpoint_variables(servers, tmp_path):
    """Another store named by the variables (a server on another port) is the one written to,
    and the first one again when the variables come back: no client of the old one is kept."""
    url = f"s3://{BUCKET}/follow/{tmp_path.name}.txt"
    storage.path(url).write_text("first")
    with S3Server() as other:
        before = set_environment(other.env)
        try:
            assert not storage.path(url).exists()
            storage.path(url).write_text("other")
        finally:
            restore_environment(before)
    assert storage.path(url).read_text() == "first"


def test_two_processes_write_one_gcs_run_restored_on_one(servers, tokenizer_dir, tmp_path):
    """2 processes x 4 CPU devices train into one gs:// run dir (each writes its shards of every
    checkpoint there) with the losses of one process with 8 devices; this process (1 x 8)
    restores the bucket's checkpoint: the reference run's state."""
    import jax

    from ettin_jax.config.schema import MeshConfig
    from ettin_jax.training.checkpoint import TrainCheckpointer
    from ettin_jax.training.mesh import make_mesh
    from ettin_jax.training.optimizer import make_optimizer
    from ettin_jax.training.state import abstract_state, init_state
    from object_stores import free_port

    overrides = [*SMALL, "logging.tensorboard=false", f"data.tokenizer={tokenizer_dir}",
                 "train.objectives=[mlm]", "train.steps=4"]
    recipe = load_recipe(RECIPE, overrides)
    train_pair(recipe, tmp_path / "reference")
    expected = read_metrics(tmp_path / "reference" / "encoder")

    run = f"gs://{BUCKET}/runs/{tmp_path.name}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "ettin_jax", "train", str(RECIPE), *overrides,
         "--run-dir", run, "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-3000:]
    records = read_metrics(f"{run}/encoder")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for ours, reference in zip(records, expected):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5), ours["step"]
        assert ours["tokens"] == reference["tokens"]
    assert _complete_steps(f"{run}/encoder") == [2, 4]
    step_dir = storage.path(run) / "encoder" / CHECKPOINTS / "4" / "params"
    assert {p.name for p in step_dir.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                                  "ocdbt.process_1"}

    optimizer = make_optimizer(recipe.optimizer)
    mesh = make_mesh(MeshConfig(8, 1))
    _, shardings = init_state(recipe.model, "mlm", optimizer, mesh, seed=0)
    target = abstract_state(shardings, recipe.model, "mlm", optimizer)
    states = []
    for member_dir in (f"{run}/encoder", tmp_path / "reference" / "encoder"):
        with TrainCheckpointer(member_dir, recipe.checkpoint) as checkpoints:
            state, progress, _ = checkpoints.restore(4, target)
        assert progress["tokens"] == expected[-1]["tokens"]
        states.append(state)
    ours, reference = (jax.tree.leaves(s.params) for s in states)
    assert all(a.sharding == b.sharding for a, b in zip(ours, reference))
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
