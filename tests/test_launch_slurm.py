"""`ettin-jax launch slurm`: the sbatch script, its submission through fake `sbatch`/`squeue`,
its requeue trap, and its `srun` line run here as two processes that train one run."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ettin_jax.cli import main
from ettin_jax.config import load_recipe
from ettin_jax.launch import slurm
from ettin_jax.training.checkpoint import has_checkpoints
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
TRAIN = ["train.seq_len=64", "model.num_layers=2", "logging.every_steps=1",
         "checkpoint.every_steps=1000", "train.steps=3"]

# The fakes log each call as one JSON line {"argv": [...], "env": {SLURM_*}} to $FAKE_LOG/NAME.
_RECORD = """
import json, os, sys
def record(name):
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    with open(os.path.join(os.environ["FAKE_LOG"], name), "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "env": env}) + "\\n")
"""
FAKES = {
    "sbatch": """
record("sbatch")
if os.environ.get("FAKE_SBATCH_FAIL"):
    print("sbatch: error: Batch job submission failed: Invalid account", file=sys.stderr)
    sys.exit(1)
print(os.environ.get("FAKE_JOB_ID", "4242") + ";cluster1")
""",
    "squeue": """
record("squeue")
print("\\n".join(os.environ.get("FAKE_QUEUED", "").split()))
""",
    "scontrol": 'record("scontrol")\n',
    # SIGTERM to the tasks of the fake srun, as `scancel --signal=TERM JOB` does to job steps.
    "scancel": """
import signal
record("scancel")
if "--signal=TERM" in sys.argv:
    path = os.path.join(os.environ["FAKE_LOG"], "tasks.pids")
    for pid in open(path).read().split():
        os.kill(int(pid), signal.SIGTERM)
""",
    # One copy of the command per task, with the variables SLURM gives a task of a
    # one-task-per-node step on nodes 127.0.0.1 (JAX takes the first node as coordinator).
    "srun": """
import subprocess, time
record("srun")
args = sys.argv[1:]
ntasks = 1
while args[0].startswith("-"):
    option = args.pop(0)
    if option.startswith("--ntasks="):
        ntasks = int(option.split("=", 1)[1])
tasks = []
for rank in range(ntasks):
    env = {**os.environ, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(rank),
           "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_STEPID": "0",
           "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_STEP_NUM_NODES": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NNODES": str(ntasks)}
    tasks.append(subprocess.Popen(args, env=env))
with open(os.path.join(os.environ["FAKE_LOG"], "tasks.pids"), "w") as f:
    f.write(" ".join(str(t.pid) for t in tasks))
while any(t.poll() is None for t in tasks):
    if any(t.poll() not in (None, 0) for t in tasks):  # --kill-on-bad-exit
        for t in tasks:
            if t.poll() is None:
                t.kill()
    time.sleep(0.05)
sys.exit(next((t.returncode for t in tasks if t.returncode), 0))
""",
}
# A stand-in for the training task (given as --executable): logs that it started, then exits with
# $TASK_STATUS, or 0 on SIGTERM after logging it; waits for SIGTERM when $TASK_WAIT is set.
STAND_IN = """
import signal, time
record("task")
def stop(signum, frame):
    record("task-sigterm")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(os.environ["FAKE_LOG"], "started-" + os.environ["SLURM_PROCID"]), "w").close()
while os.environ.get("TASK_WAIT"):
    time.sleep(0.05)
sys.exit(int(os.environ.get("TASK_STATUS", "0")))
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin folder of fake SLURM commands first on PATH, their call log folder, and the
    environment for running a generated script (a batch job's variables, no JAX port)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in {**FAKES, "stand-in": STAND_IN}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{_RECORD}{textwrap.dedent(body)}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return bin_dir, log


def _calls(log: Path, name: str) -> list[dict]:
    path = log / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _launch(tmp_path, *options: str, overrides=TRAIN) -> list[str]:
    return ["launch", "slurm", str(RECIPE), *overrides, "--run-dir", str(tmp_path / "run"),
            *options]


def test_script_holds_the_job_options_the_trap_and_the_srun_line(tmp_path, capsys):
    rc = main(_launch(tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task",
                      "32", "--partition", "gpu", "--account", "lm", "--time", "2-00:00:00",
                      "--max-requeues", "3", "--warn-seconds", "240", "--sbatch-option=--mem=0",
                      "--setup", "module load cuda/12", "--env", "NCCL_DEBUG=WARN",
                      "--train-option=--only=encoder", "--dry-run"))
    assert rc == 0
    out = capsys.readouterr().out
    launch_dir = tmp_path / "run" / "slurm"
    sbatch = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "--job-name=ettin-run", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--cpus-per-task=32", "--partition=gpu", "--account=lm", "--time=2-00:00:00",
        "--requeue", "--signal=B:USR1@240", "--open-mode=append",
        f"--output={launch_dir}/slurm-%j.out", f"--chdir={Path.cwd()}", "--mem=0"]
    copy = out.split("recipe copy: ")[1].split(")")[0]
    assert Path(copy).parent == launch_dir and Path(copy).suffix == ".yaml"
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert srun == (f"srun --cpus-per-task=32 --nodes=4 --ntasks=4 --ntasks-per-node=1 "
                    f"--kill-on-bad-exit=1 {slurm.default_executable()} train {copy} "
                    f"{' '.join(TRAIN)} --run-dir {tmp_path / 'run'} --only=encoder &")
    for line in ["module load cuda/12", "export NCCL_DEBUG=WARN",
                 "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "max_requeues=3",
                 "trap on_warning USR1", 'scancel --signal=TERM "$SLURM_JOB_ID"',
                 'scontrol requeue "$SLURM_JOB_ID" && exit 0']:
        assert line in out.splitlines() or f"  {line}" in out.splitlines() \
            or f"    {line}" in out.splitlines(), line
    assert out.rstrip().endswith(f"# submit: sbatch --parsable {launch_dir}/ettin-run.sbatch")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_submits_nothing(tmp_path, fake_slurm, capsys):
    _, log = fake_slurm
    assert main(_launch(tmp_path, "--nodes", "2", "--dry-run")) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert not list(log.iterdir())


def test_submit_copies_the_recipe_writes_the_script_and_prints_the_job_id(tmp_path, fake_slurm,
                                                                          capsys, monkeypatch):
    _, log = fake_slurm
    monkeypatch.setenv("FAKE_JOB_ID", str(random.randrange(1, 10**6)))
    assert main(_launch(tmp_path, "--nodes", "2", "--job-name", "pretrain")) == 0
    out, err = capsys.readouterr()
    assert out == os.environ["FAKE_JOB_ID"] + "\n"
    assert f"slurm-{os.environ['FAKE_JOB_ID']}.out" in err
    launch_dir = tmp_path / "run" / "slurm"
    [call] = _calls(log, "sbatch")
    assert call["argv"] == ["--parsable", str(launch_dir / "pretrain.sbatch")]
    assert _calls(log, "squeue")[0]["argv"] == ["--me", "--noheader", "--name=pretrain",
                                               "--format=%i"]
    [copy] = launch_dir.glob("recipe-*.yaml")
    assert copy.read_bytes() == RECIPE.read_bytes()
    assert f"train {copy} " in (launch_dir / "pretrain.sbatch").read_text()


def test_refuses_while_a_job_of_the_same_name_is_queued(tmp_path, fake_slurm, monkeypatch):
    _, log = fake_slurm
    monkeypatch.setenv("FAKE_QUEUED", "777")
    with pytest.raises(slurm.SlurmError, match="job 777 named 'ettin-run' is already queued"):
        slurm.submit(slurm.prepare(slurm.SlurmJob(str(RECIPE), str(tmp_path / "run"), 2)))
    assert not _calls(log, "sbatch")
    job_id = slurm.submit(slurm.prepare(slurm.SlurmJob(str(RECIPE), str(tmp_path / "run"), 2)),
                          allow_running=True)
    assert job_id == "4242"


def test_a_failed_sbatch_is_reported_with_its_message(tmp_path, fake_slurm, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    assert main(_launch(tmp_path, "--nodes", "2")) == 2
    assert "Invalid account" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--nodes", "2", "--time", "1:2:3:4"], "--time '1:2:3:4': not a SLURM time"),
    (["--nodes", "2", "--time", "04:00"], "--time 04:00 (240 s) leaves no training"),
    (["--nodes", "2", "--max-requeues", "-1"], "--max-requeues -1"),
    (["--nodes", "2", "--job-name", "my run"], "--job-name 'my run'"),
    (["--nodes", "2", "--sbatch-option=--nodes=3"], "sets --nodes itself (use --nodes)"),
    (["--nodes", "2", "--sbatch-option=--signal=USR2@60"], "(use --warn-seconds)"),
    (["--nodes", "2", "--sbatch-option=exclusive"], "one sbatch option per --sbatch-option"),
    (["--nodes", "2", "--sbatch-option=--gres=gpu:8"], "give GPUs with --gpus-per-node"),
    (["--nodes", "2", "--env", "1X=2"], "--env '1X=2'"),
])
def test_bad_arguments_are_named(tmp_path, capsys, options, message):
    assert main(_launch(tmp_path, *options, "--dry-run")) == 2
    assert message in capsys.readouterr().err


def test_a_bad_recipe_or_override_fails_before_submitting(tmp_path, fake_slurm, capsys):
    _, log = fake_slurm
    assert main(_launch(tmp_path, "--nodes", "2", overrides=["train.stepz=3"])) == 2
    assert "train.stepz" in capsys.readouterr().err
    missing = ["launch", "slurm", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path),
               "--nodes", "2"]
    assert main(missing) == 2
    assert "nope.yaml" in capsys.readouterr().err and not list(log.iterdir())


def test_a_url_run_dir_needs_a_launch_dir(tmp_path, capsys):
    options = ["launch", "slurm", str(RECIPE), "--run-dir", "gs://bucket/runs/r1", "--nodes",
               "2", "--dry-run"]
    assert main(options) == 2
    assert "give --launch-dir DIR" in capsys.readouterr().err
    assert main([*options, "--launch-dir", str(tmp_path / "launch")]) == 0
    out = capsys.readouterr().out
    assert f"--output={tmp_path / 'launch'}/slurm-%j.out" in out
    assert "--run-dir gs://bucket/runs/r1" in out and "#SBATCH --job-name=ettin-r1" in out


@pytest.mark.parametrize("value, seconds", [
    ("90", 5400), ("90:30", 5430), ("12:00:00", 43200), ("2-0", 172800), ("1-2:3", 93780),
    ("1-02:03:04", 93784), ("UNLIMITED", None)])
def test_time_limits_parse_as_slurm_reads_them(value, seconds):
    assert slurm.time_limit_seconds(value) == seconds


# ---- the generated script, run by bash with the fake srun/scancel/scontrol ----

def _script(tmp_path, *options: str, executable: str | None = None, overrides=TRAIN,
            max_requeues: int = 2) -> Path:
    job = slurm.SlurmJob(str(RECIPE), str(tmp_path / "run"), 2, overrides=tuple(overrides),
                         executable=executable or slurm.default_executable(),
                         train_options=tuple(options),
                         max_requeues=max_requeues)
    launch = slurm.prepare(job)
    Path(launch.job.launch_dir).mkdir(parents=True)
    Path(launch.recipe_copy).write_bytes(RECIPE.read_bytes())
    Path(launch.script_path).write_text(launch.script)
    return Path(launch.script_path)


def _job_id_with_a_free_port() -> int:
    """A job id whose JAX coordinator port (61440 + id % 4096, jax's slurm_cluster) is free."""
    while True:
        port = random.randrange(61440, 65536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * random.randrange(1, 1000) + port - 61440


def _batch_env(job_id: int, restarts: int | None = None, **extra: str) -> dict:
    """The batch shell's environment under SLURM (2 nodes) for CPU training."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "XLA_FLAGS"))}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="127.0.0.1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0", **extra)
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    return env


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("restarts, requeued, status", [(None, True, 0), (2, False, 75)])
def test_the_warning_stops_the_tasks_then_requeues_within_the_bound(tmp_path, fake_slurm,
                                                                    restarts, requeued, status):
    bin_dir, log = fake_slurm
    script = _script(tmp_path, executable=str(bin_dir / "stand-in"))
    job_id = random.randrange(1, 10**6)
    env = _batch_env(job_id, restarts, TASK_WAIT="1")
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: all((log / f"started-{i}").exists() for i in range(2)), "the tasks")
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=60)
    assert shell.returncode == status, out
    assert [c["argv"] for c in _calls(log, "scancel")] == [["--signal=TERM", str(job_id)]]
    assert len(_calls(log, "task-sigterm")) == 2  # both tasks were told, and stopped cleanly
    requeues = [c["argv"] for c in _calls(log, "scontrol")]
    assert requeues == ([["requeue", str(job_id)]] if requeued else []), out
    assert ("requeues spent" in out) == (not requeued)
    [task] = {json.dumps(c["argv"]) for c in _calls(log, "task")}
    assert json.loads(task)[:2] == ["train", str(next(script.parent.glob("recipe-*.yaml")))]


def test_sigterm_waits_for_the_tasks_and_a_failure_is_not_requeued(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    script = _script(tmp_path, executable=str(bin_dir / "stand-in"))
    shell = subprocess.Popen(["bash", str(script)], env=_batch_env(7, TASK_WAIT="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: all((log / f"started-{i}").exists() for i in range(2)), "the tasks")
    shell.send_signal(signal.SIGTERM)  # a preemption: SLURM signals the tasks itself
    time.sleep(0.3)
    assert shell.poll() is None  # still waiting for its tasks
    for pid in (log / "tasks.pids").read_text().split():
        os.kill(int(pid), signal.SIGTERM)
    out, _ = shell.communicate(timeout=60)
    assert shell.returncode == 0 and "SIGTERM: waiting" in out, out
    assert not _calls(log, "scontrol") and not _calls(log, "scancel")
    result = subprocess.run(["bash", str(script)], env=_batch_env(8, TASK_STATUS="3"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "training ended with status 3" in result.stdout
    assert not _calls(log, "scontrol")


def test_the_srun_line_trains_one_run_as_two_processes(tmp_path, fake_slurm, tokenizer_dir):
    """The generated script, run by bash: the fake srun starts two `ettin-jax train` tasks with
    SLURM's variables; JAX's SLURM detection joins them into one run on 2 x 4 CPU devices
    (mesh.data=8 needs both processes' devices), whose losses are those of one process with
    eight devices."""
    _, log = fake_slurm
    overrides = [*TRAIN, f"data.tokenizer={tokenizer_dir}", "mesh.data=8"]
    script = _script(tmp_path, "--cpu-devices=4", "--only=encoder", overrides=overrides)
    result = subprocess.run(["bash", str(script)], env=_batch_env(_job_id_with_a_free_port()),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training ended with status 0" in result.stdout
    [call] = _calls(log, "srun")
    assert call["argv"][:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                "--kill-on-bad-exit=1"]
    run_dir = tmp_path / "run"
    assert has_checkpoints(run_dir)
    records = read_metrics(run_dir / "encoder")
    assert [r["step"] for r in records] == [1, 2, 3]
    reference = tmp_path / "reference"  # this test process has eight CPU devices
    train_pair(load_recipe(RECIPE, overrides), reference, only="encoder")
    for ours, theirs in zip(records, read_metrics(reference / "encoder"), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["tokens"] == theirs["tokens"]
