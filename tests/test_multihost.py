"""Two processes x 4 CPU devices over loopback train like one process with 8 devices, and a dead
peer stops the survivor with a clear error instead of a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ettin_jax.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.seq_len=64", "model.num_layers=2", "logging.every_steps=1",
          "checkpoint.every_steps=1000"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data_pipelines.corpus import bundled_documents
    from data_pipelines.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, vocab_size=512, texts=[d.text for d in bundled_documents()[:4]])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(run_dir, tokenizer_dir, steps, *extra):
    return [sys.executable, "-m", "ettin_jax", "train", str(ROOT / "recipes" / "tiny.yaml"),
            *COMMON, f"train.steps={steps}", f"data.tokenizer={tokenizer_dir}",
            "--run-dir", str(run_dir), "--only", "encoder", *extra]


def _env():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


def _processes(run_dir, tokenizer_dir, steps, *, timeout=None):
    port = _free_port()
    extra = ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [subprocess.Popen(_command(run_dir, tokenizer_dir, steps, *extra, "--process-id",
                                      str(i), *(["--peer-timeout", str(timeout)] if timeout
                                                else [])),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(2)]


def test_two_processes_equal_one_process_with_eight_devices(tokenizer_dir, tmp_path):
    subprocess.run(_command(tmp_path / "single", tokenizer_dir, 3, "--cpu-devices", "8"),
                   env=_env(), check=True, capture_output=True)
    processes = _processes(tmp_path / "multi", tokenizer_dir, 3)
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    single = read_metrics(tmp_path / "single" / "encoder")
    multi = read_metrics(tmp_path / "multi" / "encoder")  # written by process 0 only
    assert [r["step"] for r in multi] == [1, 2, 3]
    for a, b in zip(single, multi):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["tokens"] == a["tokens"]


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
    assert b"stopped sending heartbeats" in err
