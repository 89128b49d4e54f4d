"""`ettin-jax launch tpu` against a fake `gcloud` (tests/fake_gcloud/gcloud.py) first on PATH:
the recorded calls of a run, a preemption, a permanent failure, a dry run and bad arguments."""

from __future__ import annotations

import json
import os
import shlex
import sys
import zipfile
from pathlib import Path

import pytest

from ettin_jax import cli
from ettin_jax.config import load_recipe
from ettin_jax.errors import ConfigError
from ettin_jax.launch import tpu
from ettin_jax.launch.command import shell_command, train_argv

RECIPE = str(Path(__file__).parent / "recipes" / "tiny-one-phase.yaml")
FAKE = Path(__file__).parent / "fake_gcloud" / "gcloud.py"
RUN_DIR = "gs://ettin-bucket/runs/pod-1"


class FakeGcloud:
    """The fake gcloud's folder: set the scenario, read the recorded calls and uploads."""

    def __init__(self, folder: Path):
        self.folder = folder

    def scenario(self, **settings) -> None:
        (self.folder / "scenario.json").write_text(json.dumps(settings))

    def calls(self) -> list[list[str]]:
        path = self.folder / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["argv"] for line in path.read_text().splitlines()]

    def verbs(self) -> list[str]:
        """Each call as a short word: upload, create, describe, install, train, delete,
        delete-async."""
        names = []
        for argv in self.calls():
            if argv[:2] == ["storage", "cp"]:
                names.append("upload")
            elif argv[3:4] == ["ssh"]:
                names.append("train" if "ettin-jax train" in argv[-1] else "install")
            elif argv[3] == "delete":
                names.append("delete-async" if "--async" in argv else "delete")
            else:
                names.append(argv[3])
        return names


@pytest.fixture
def gcloud(tmp_path, monkeypatch) -> FakeGcloud:
    """A fake gcloud first on PATH, the wheel build replaced by a stand-in file (the real build
    has its own test) and the staging folder in tmp_path."""
    folder = tmp_path / "gcloud"
    (folder / "bin").mkdir(parents=True)
    wrapper = folder / "bin" / "gcloud"
    # -S: the fake needs only the standard library, and starts faster without site-packages.
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "
                       f'{shlex.quote(str(FAKE))} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(folder))
    monkeypatch.setattr(tpu, "local_staging_dir", lambda launch: tmp_path / "staging")

    def fake_build(root: Path, staging: Path) -> Path:
        wheel = staging / "wheel" / tpu.wheel_name(root)
        wheel.parent.mkdir(parents=True)
        wheel.write_bytes(os.urandom(64))
        return wheel

    monkeypatch.setattr(tpu, "build_wheel", fake_build)
    return FakeGcloud(folder)


def launch_args(*extra: str) -> list[str]:
    return ["launch", "tpu", RECIPE, "train.steps=7", "--run-dir", RUN_DIR, "--name",
            "ettin-pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
            "--poll-interval", "0", *extra]


def test_run_without_preemption_runs_the_dry_runs_commands(gcloud, capsys):
    gcloud.scenario(waiting_polls=2)
    assert cli.main(launch_args("--spot", "--dry-run")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert gcloud.calls() == []  # the dry run ran nothing
    assert not (gcloud.folder.parent / "staging").exists()

    assert cli.main(launch_args("--spot")) == 0
    calls = gcloud.calls()
    assert gcloud.verbs() == ["upload", "upload", "create", "describe", "describe", "describe",
                              "install", "train", "delete-async"]
    # The same commands as the dry run printed, in its order (it shows one describe); the
    # first line is the local wheel build.
    assert "pip wheel --no-deps" in printed[0]
    unique = [c for i, c in enumerate(calls) if c != calls[i - 1] or i == 0]
    assert [shlex.join(["gcloud", *c]) for c in unique] == printed[1:]
    create = calls[2]
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "ettin-pod"]
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    assert "--spot" in create and "--reserved" not in create
    train = calls[7][-1]
    assert train.endswith(shell_command(train_argv("recipe.yaml", RUN_DIR,
                                                   executable="venv/bin/ettin-jax")))
    assert "--worker=all" in calls[7]
    # The workers get the resolved recipe, overrides applied, and the pinned install.
    uploaded = gcloud.folder / "uploads"
    assert load_recipe(uploaded / "recipe.yaml") == load_recipe(RECIPE, ["train.steps=7"])
    assert (uploaded / "requirements.lock").read_bytes() == \
        (tpu.project_root() / "requirements.lock").read_bytes()
    install = calls[6][-1]
    assert f"--constraint requirements.lock './{tpu.wheel_name(tpu.project_root())}[tpu]'" \
        in install
    assert f"{RUN_DIR}/launch/recipe.yaml" in install
    assert not (gcloud.folder.parent / "staging").exists()  # the local staging is cleaned up


def test_preemption_recreates_the_slice_and_reruns_the_same_command(gcloud, capsys):
    gcloud.scenario(train_failures=1)
    assert cli.main(launch_args("--reserved", "--max-retries", "1")) == 0
    assert gcloud.verbs() == ["upload", "upload",
                              "create", "describe", "install", "train", "describe", "delete",
                              "create", "describe", "install", "train", "delete-async"]
    calls = gcloud.calls()
    assert "--reserved" in calls[2] and calls[2] == calls[8]
    assert calls[5] == calls[11]  # the same train command against the same run dir
    assert "--async" not in calls[7] and "--force" in calls[7]
    err = capsys.readouterr().err
    assert "SUSPENDED" in err and "relaunching" in err


def test_retries_spent_exits_nonzero_with_one_line(gcloud, capsys):
    gcloud.scenario(stuck_state="FAILED")
    assert cli.main(launch_args("--max-retries", "2")) == 1
    assert gcloud.verbs() == ["upload", "upload",
                              "create", "describe", "delete",
                              "create", "describe", "delete",
                              "create", "describe", "delete-async"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ettin-jax launch tpu: error: gave up after 3 attempts")
    assert "FAILED" in last


def test_a_job_that_keeps_dying_spends_the_retries(gcloud, capsys):
    gcloud.scenario(train_failures=5)
    assert cli.main(launch_args("--max-retries", "1")) == 1
    assert gcloud.verbs().count("train") == 2
    assert gcloud.verbs()[-1] == "delete-async"
    assert "the training command failed" in capsys.readouterr().err


def test_create_refused_stops_at_once(gcloud, capsys):
    gcloud.scenario(create_error="RESOURCE_EXHAUSTED: quota TPUV5P exceeded")
    assert cli.main(launch_args()) == 1
    assert gcloud.verbs() == ["upload", "upload", "create"]  # nothing was created: no delete
    assert "quota TPUV5P exceeded" in capsys.readouterr().err


def test_interrupt_deletes_the_slice():
    launch = tpu.TpuLaunch(recipe=RECIPE, run_dir=RUN_DIR, name="ettin-pod", zone="z",
                           accelerator_type="v6e-16", poll_s=0)
    plan = tpu.plan_commands(launch, "model: {preset: tiny}\n")
    ran = []

    def runner(command: tpu.Command, capture: bool) -> tpu.Completed:
        ran.append(command)
        if command == plan.run:
            raise KeyboardInterrupt
        return tpu.Completed(0, "ACTIVE\n" if command == plan.describe else "")

    with pytest.raises(KeyboardInterrupt):
        tpu.supervise(launch, plan, runner=runner, sleep=lambda s: None, log=lambda m: None)
    assert ran[-1] == plan.cleanup and "--async" in plan.cleanup.argv
    assert "v2-alpha-tpuv6e" in plan.create.argv


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "runs/pod"], "needs a gs://BUCKET/PATH run directory"),
    (["--run-dir", "s3://bucket/run"], "every host writes its part of each checkpoint"),
    (["--name", "Ettin_Pod"], "lowercase letters"),
    (["--accelerator-type", "v5p"], "expected GENERATION-CORES"),
    (["--accelerator-type", "v9z-8"], "give --runtime-version"),
    (["--max-retries", "-1"], "must be 0 or more"),
])
def test_bad_arguments_are_one_clear_line(gcloud, capsys, args, message):
    assert cli.main(launch_args(*args, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert gcloud.calls() == []


def test_spot_and_reserved_exclude_each_other(gcloud, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args("--spot", "--reserved"))
    assert exit_.value.code == 2
    assert "--reserved: not allowed with argument --spot" in capsys.readouterr().err


def test_a_recipe_path_on_this_machine_is_refused(gcloud, tmp_path, capsys):
    data = tmp_path / "shards"
    data.mkdir()
    assert cli.main(launch_args(f"data.sources=[{{path: {data}, kind: prepared}}]",
                                "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "data.sources.0.path" in err and "the TPU workers cannot read" in err
    with pytest.raises(ConfigError, match="does not exist"):
        tpu.resolved_recipe(tpu.TpuLaunch(recipe=str(tmp_path / "none.yaml"), run_dir=RUN_DIR,
                                          name="a", zone="z", accelerator_type="v5p-8"))


def test_the_wheel_holds_the_working_tree(tmp_path):
    """The real build: pip's wheel of a copy of the checkout, with this module in it and no
    leftover of an earlier build."""
    root = tpu.project_root()
    wheel = tpu.build_wheel(root, tmp_path / "staging")
    assert wheel.name == tpu.wheel_name(root)
    names = zipfile.ZipFile(wheel).namelist()
    assert "ettin_jax/launch/tpu.py" in names and "data_pipelines/__init__.py" in names
    packaged = {n for n in names if n.endswith(".py")}
    tree = {str(p.relative_to(root)) for pkg in ("ettin_jax", "data_pipelines", "pallas_kernels")
            for p in (root / pkg).rglob("*.py")}
    assert packaged == tree
