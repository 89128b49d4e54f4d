"""Two processes x 4 CPU devices over loopback train like one process with 8 devices, and a dead
peer stops the survivor with a clear error instead of a hang."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ettin_jax.config import load_recipe
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.seq_len=64", "model.num_layers=2", "logging.every_steps=1",
          "checkpoint.every_steps=1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"


def _command(run_dir, tokenizer_dir, steps, overrides=(), options=()):
    return [sys.executable, "-m", "ettin_jax", "train", str(RECIPE),
            *COMMON, f"train.steps={steps}", f"data.tokenizer={tokenizer_dir}", *overrides,
            "--run-dir", str(run_dir), "--only", "encoder", *options]


def _env():
    """CPU, and the tests' XLA flags (conftest) but their device count: --cpu-devices sets it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    return env


def _processes(run_dir, tokenizer_dir, steps, overrides=(), *, timeout=None):
    port = _free_port()
    options = ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    if timeout:
        options += ["--peer-timeout", str(timeout)]
    return [subprocess.Popen(_command(run_dir, tokenizer_dir, steps, overrides,
                                      [*options, "--process-id", str(i)]),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(2)]


# Batch-size warmup: 8, 16 then 32 rows, the middle batch cut across two pipeline batches.
WARMUP = ["train.global_batch_size=32", "train.microbatch_size=8",
          "train.batch_warmup_tokens=1000"]
STEPS = 5


@pytest.fixture(scope="module")
def two_processes(tokenizer_dir, tmp_path_factory):
    """(run directory, the two processes, futures of their (stdout, stderr)) of `_command`'s
    run on two processes, started before `single_process` so that both runs proceed at once;
    threads read their pipes meanwhile (a full pipe would stall them)."""
    from concurrent.futures import ThreadPoolExecutor

    run_dir = tmp_path_factory.mktemp("two") / "multi"
    processes = _processes(run_dir, tokenizer_dir, STEPS, WARMUP)
    with ThreadPoolExecutor(len(processes)) as pool:
        outputs = [pool.submit(process.communicate, timeout=300) for process in processes]
        yield run_dir, processes, outputs
        for process in processes:  # only when a test failed before they ended
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def single_process(tokenizer_dir, tmp_path_factory):
    """Metrics of the run on one process with 8 devices, the reference: this test process
    (eight CPU devices) stands in for a separate one."""
    run_dir = tmp_path_factory.mktemp("single")
    _train_here(run_dir, tokenizer_dir)
    return read_metrics(run_dir / "encoder")


def _train_here(run_dir, tokenizer_dir) -> None:
    """`_command`'s run, in this process on its 8 devices."""
    recipe = load_recipe(RECIPE, [*COMMON, f"train.steps={STEPS}",
                                  f"data.tokenizer={tokenizer_dir}", *WARMUP])
    train_pair(recipe, run_dir, only="encoder")


def _assert_same_run(records, reference):
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for a, b in zip(reference, records):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens"], b["batch_rows"]) == (a["tokens"], a["batch_rows"])


def test_two_processes_equal_one_process_with_eight_devices(two_processes, single_process):
    run_dir, processes, outputs = two_processes
    for process, output in zip(processes, outputs):
        _, err = output.result()
        assert process.returncode == 0, err.decode()[-2000:]
    assert len({r["batch_rows"] for r in single_process}) == 3
    _assert_same_run(read_metrics(run_dir / "encoder"), single_process)  # process 0's


def test_sigterm_to_one_process_stops_both_and_the_run_resumes_on_one(single_process,
                                                                      tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    processes = _processes(run_dir, tokenizer_dir, STEPS, WARMUP)
    deadline = time.time() + 240
    while not read_metrics(run_dir / "encoder") and time.time() < deadline:
        assert all(p.poll() is None for p in processes)
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # preemption notice on one host only
    outputs = [p.communicate(timeout=300) for p in processes]
    stopped = [int(re.search(rb"preempted \(SIGTERM\) at step (\d+)", out).group(1))
               for out, _ in outputs]
    assert all(p.returncode == 0 for p in processes) and stopped[0] == stopped[1] < STEPS
    # The same run goes on as one process with 8 devices: every process's rows were saved.
    _train_here(run_dir, tokenizer_dir)
    _assert_same_run(read_metrics(run_dir / "encoder"), single_process)


def test_a_dead_peer_stops_the_survivor(tokenizer_dir, tmp_path):
    survivor, victim = _processes(tmp_path / "run", tokenizer_dir, 100_000, timeout=5)
    deadline = time.time() + 240
    while not read_metrics(tmp_path / "run" / "encoder") and time.time() < deadline:
        assert survivor.poll() is None
        time.sleep(0.2)
    victim.kill()
    start = time.time()
    _, err = survivor.communicate(timeout=120)  # bounded: no hang
    assert survivor.returncode != 0 and time.time() - start < 90
    # JAX's coordination service reports the silent peer, unless the collective in flight at
    # that moment (gloo, on CPU) fails first.
    assert b"stopped sending heartbeats" in err or b"gloo" in err, err.decode()[-2000:]
