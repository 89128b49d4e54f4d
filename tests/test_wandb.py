"""Weights & Biases logging (logging.wandb), in W&B's offline mode: a trained member's W&B run
read back from W&B's own transaction log (.wandb) holds metrics.jsonl's records at their steps,
the resolved recipe as its config, the phase end and the deterministic run id; a resumed run
continues the same id without logging a step twice; the recipe key's validation; the missing
package's error."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest

from ettin_jax import storage
from ettin_jax.config import load_recipe, recipe_to_dict
from ettin_jax.errors import ConfigError
from ettin_jax.training import wandb_logging
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.trainer import train_pair
from ettin_jax.training.wandb_logging import (
    last_logged_step,
    local_files_dir,
    normalised_location,
    run_name,
    wandb_run_id,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# The encoder alone, 4 steps, held-out evaluation at steps 2 and 4, checkpoints at 2 and 4; a
# schedule that does not depend on the step budget (so a longer second run recomputes the
# same steps 3 and 4).
SMALL = ["train.seq_len=64", "train.global_batch_size=8", "model.num_layers=2",
         "logging.every_steps=1", "train.objectives=[mlm]", "train.steps=4",
         "checkpoint.every_steps=2", "checkpoint.keep=3", "logging.eval_every_steps=2",
         "logging.eval_batches=1", "schedule.warmup_tokens=300", "schedule.decay_tokens=0",
         "logging.wandb={project: ettin-tests, name: tiny, tags: [smoke], alerts: true,"
         " mode: offline}"]
# Keys W&B adds to every history row.
WANDB_KEYS = {"_step", "_runtime", "_timestamp"}
# Record keys measured in wall time (a recomputed step has other values).
TIMINGS = {"tokens_per_s", "step_time_s", "flops_per_s", "mfu"}


@pytest.fixture(scope="module", autouse=True)
def wandb_service():
    """Stops W&B's service process (started by the first run) after this module's tests."""
    yield
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode, its files under tmp_path/wandb-files, quiet, no system metrics."""
    files = tmp_path / "wandb-files"
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(files),
                        "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DISABLE_GIT": "true", "WANDB__DISABLE_STATS": "true",
                        "WANDB__DISABLE_MACHINE_INFO": "true"}.items():
        monkeypatch.setenv(name, value)
    return files


def read_transaction_log(path: Path) -> list:
    """The records (wandb_internal_pb2.Record) of a .wandb file: W&B's 7-byte header, then a
    LevelDB log (32 KiB blocks of chunks, each with a 7-byte header: crc32c, length, type
    FULL=1/FIRST=2/MIDDLE=3/LAST=4) of serialised Record protos."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, pieces, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def finished_transaction_log(path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run's .wandb file, once W&B's service wrote its exit record
    (`run.finish()` returns before the service has flushed the file)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_transaction_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def offline_runs(files: Path, run_id: str) -> list[dict]:
    """Each offline run of `run_id` under W&B's directory, oldest first: its run record, config,
    history rows {_step: {key: value}}, summary updates, alerts, whether it was marked
    preempting, and its exit code."""
    runs, found = [], []
    for directory in (files / "wandb").glob(f"offline-run-*-{run_id}*"):
        # offline-run-<start second>-<id>, and -1, -2, ... for later runs in the same second
        match = re.fullmatch(rf"offline-run-(\d{{8}}_\d{{6}})-{run_id}(?:-(\d+))?",
                             directory.name)
        if match:
            found.append(((match[1], int(match[2] or 0)), directory))
    for _, directory in sorted(found):
        run, config, history, summary, alerts = None, {}, {}, {}, []
        preempting, exit_code = False, None
        for record in finished_transaction_log(directory / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({u.key: json.loads(u.value_json) for u in run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                       for i in record.history.item}
                assert row["_step"] not in history, f"step {row['_step']} logged twice"
                history[row["_step"]] = row
            elif kind == "summary":
                summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                for u in record.summary.update})
            elif kind == "alert":
                alerts.append((record.alert.title, record.alert.level))
            elif kind == "preempting":
                preempting = True
            elif kind == "exit":
                exit_code = record.exit.exit_code
        runs.append({"run": run, "config": config, "history": history, "summary": summary,
                     "alerts": alerts, "preempting": preempting, "exit": exit_code})
    return runs


def test_a_member_logs_its_records_config_and_phase_end_and_resumes_the_same_run(
        tmp_path, tokenizer_dir, offline_wandb):
    run_dir = tmp_path / "run"
    recipe = load_recipe(TINY, [*SMALL, f"data.tokenizer={tokenizer_dir}"])
    assert train_pair(recipe, run_dir)["encoder"].step == 4
    run_id = wandb_run_id(run_dir, "encoder")
    (first,) = offline_runs(offline_wandb, run_id)
    records = read_metrics(run_dir / "encoder")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "eval_loss" in records[1] and "eval_loss" in records[3]  # held-out metrics

    assert (first["run"].run_id, first["run"].display_name, first["run"].project,
            first["run"].run_group, list(first["run"].tags)) == \
        (run_id, "tiny-encoder", "ettin-tests", "tiny", ["smoke", "encoder"])
    config = {k: v for k, v in first["config"].items() if k != "_wandb"}
    assert config == json.loads(json.dumps(recipe_to_dict(load_recipe(run_dir / "recipe.yaml"))))
    # Each row is the record metrics.jsonl got, at its step; the phase's end at its last step.
    assert sorted(first["history"]) == [1, 2, 3, 4]
    for record in records:
        row = {k: v for k, v in first["history"][record["step"]].items() if k not in WANDB_KEYS}
        assert row.pop("phase_end", None) == (0 if record["step"] == 4 else None)
        assert row == record
    assert first["summary"]["phase_end/main"] == {"index": 0, "step": 4,
                                                  "tokens": records[-1]["tokens"],
                                                  "loss": records[-1]["loss"]}
    assert first["alerts"] == [("tiny-encoder: phase main done", "INFO")]

    # Killed after step 4 was logged but before its checkpoint: the resumed run restarts from
    # step 2, longer now; W&B gets steps 5 and 6 only, in the same run.
    shutil.rmtree(run_dir / "encoder" / "checkpoints" / "4")
    longer = load_recipe(TINY, [*SMALL, f"data.tokenizer={tokenizer_dir}", "train.steps=6"])
    assert train_pair(longer, os.path.relpath(run_dir), force=True)["encoder"].step == 6
    records = read_metrics(run_dir / "encoder")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    first, second = offline_runs(offline_wandb, run_id)
    assert second["run"].run_id == run_id and sorted(second["history"]) == [5, 6]
    logged = {**first["history"], **second["history"]}
    for record in records:  # the recomputed steps 3 and 4 equal the logged ones but in time
        row = {k: v for k, v in logged[record["step"]].items()
               if k not in WANDB_KEYS | {"phase_end"}}
        if record["step"] in (3, 4):
            row, record = ({k: v for k, v in r.items() if k not in TIMINGS} for r in (row, record))
        assert row == record
    assert second["history"][6]["phase_end"] == 0
    assert second["config"]["train"]["steps"] == 6


def test_run_ids_follow_the_run_directory_and_member(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    same = {wandb_run_id(p, "encoder") for p in
            ["run", "./run/", tmp_path / "run", f"file://{tmp_path}/run", tmp_path / "link"]}
    assert len(same) == 1
    assert same.pop() != wandb_run_id("run", "decoder")
    assert wandb_run_id("gs://bucket//runs/a/", "decoder") == \
        wandb_run_id("GS://bucket/runs/a", "decoder") != wandb_run_id("gs://bucket/runs/b",
                                                                      "decoder")
    assert normalised_location("s3://b/x//y/") == "s3://b/x/y"
    assert wandb_run_id("gs://bucket/runs/a", "encoder").startswith("encoder-")
    config = load_recipe(TINY, ["logging.wandb={}"]).logging.wandb
    assert run_name(config, "gs://bucket/runs/a/", "encoder") == "a-encoder"
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert local_files_dir("gs://bucket/runs/a") == str(tmp_path / "cache" / "ettin-jax" / "wandb")
    assert local_files_dir("run") == str(tmp_path / "run")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))
    assert local_files_dir("gs://bucket/runs/a") == str(tmp_path / "w")


def test_steps_wandb_may_hold_are_not_logged_again():
    records = [{"step": s} for s in (10, 20, 30)]
    assert last_logged_step([], 0) == 0
    assert last_logged_step(records, 0) == 30  # offline: metrics.jsonl as the member found it
    assert last_logged_step(records, 36) == 35  # online: W&B's next step is 36
    assert last_logged_step(records[:1], 21) == 20


@pytest.mark.parametrize("override, message", [
    ("logging.wandb={projekt: x}", "unknown key 'logging.wandb.projekt'. Did you mean 'project'"),
    ("logging.wandb={project: a/b}", "logging.wandb.project: project 'a/b' must not contain /"),
    ("logging.wandb={mode: online-ish}", "logging.wandb.mode: invalid value str 'online-ish'"),
    ("logging.wandb={tags: ['']}", "logging.wandb.tags: tags must be strings of 1 to 64"),
    ("logging.wandb={name: ''}", "logging.wandb.name: name must be a non-empty string"),
    ("logging.wandb=[x]", "logging.wandb: expected a mapping of WandbConfig fields"),
])
def test_bad_wandb_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(TINY, [override])


def test_logging_wandb_is_optional_and_resume_compatible(tmp_path):
    assert load_recipe(TINY).logging.wandb is None
    recipe = load_recipe(TINY, ["logging.wandb.project=p", "logging.wandb.mode=offline"])
    assert (recipe.logging.wandb.project, recipe.logging.wandb.mode) == ("p", "offline")
    from ettin_jax.training.run_dir import claim_run_dir

    claim_run_dir(tmp_path, load_recipe(TINY))
    (tmp_path / "encoder" / "checkpoints" / "3").mkdir(parents=True)
    assert list(claim_run_dir(tmp_path, recipe)) == ["logging.wandb"]  # accepted


def test_a_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb .*pip install 'ettin-jax\[wandb\]'"):
        wandb_logging.import_wandb()


def test_a_stopped_run_says_why_and_an_error_finishes_it(tmp_path, offline_wandb):
    from ettin_jax.training.trainer import MemberResult

    recipe = load_recipe(TINY, ["logging.wandb={project: p, alerts: true, mode: offline}"])
    member_dir = tmp_path / "run" / "decoder"
    run_id = wandb_run_id(tmp_path / "run", "decoder")
    logged = [{"step": 1}, {"step": 2}]  # metrics.jsonl as a relaunched member found it
    with wandb_logging.member_wandb(recipe, member_dir, logged=logged) as wandb_run:
        assert wandb_run.run.id == run_id and wandb_run.first_step == 3
        for step in (2, 3):
            wandb_run.log_record({"step": step, "loss": 1.0 / step})
        wandb_run.end(MemberResult("decoder", 3, 99, 0.3, stopped="preempted (SIGTERM) at 3"))
    with pytest.raises(RuntimeError, match="boom"):
        with wandb_logging.member_wandb(recipe, member_dir, logged=[]) as wandb_run:
            raise RuntimeError("boom")
    preempted, crashed = offline_runs(offline_wandb, run_id)
    assert sorted(preempted["history"]) == [3]  # step 2 was logged before
    assert preempted["summary"]["stopped"] == "preempted (SIGTERM) at 3"
    assert preempted["alerts"] == [("run-decoder: stopped", "WARN")]
    assert (preempted["exit"], crashed["exit"]) == (1, 1)
    assert preempted["preempting"] and not crashed["preempting"]
    with wandb_logging.member_wandb(load_recipe(TINY), member_dir, logged=[]) as wandb_run:
        assert wandb_run is None  # no logging.wandb: no W&B


def test_training_into_a_bucket_logs_to_wandb(tmp_path, tokenizer_dir, offline_wandb,
                                               monkeypatch):
    from object_stores import BUCKET, GcsServer

    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = f"gs://{BUCKET}/runs/{tmp_path.name}"
    recipe = load_recipe(TINY, [*SMALL, f"data.tokenizer={tokenizer_dir}", "train.steps=2",
                                "logging.eval_every_steps=0"])
    with GcsServer() as gcs:
        for name, value in gcs.env.items():
            monkeypatch.setenv(name, value)
        train_pair(recipe, run)
        records = read_metrics(storage.path(run) / "encoder")
    (only,) = offline_runs(tmp_path / "cache" / "ettin-jax" / "wandb",
                           wandb_run_id(run, "encoder"))
    assert only["run"].display_name == "tiny-encoder"
    assert [r["step"] for r in records] == sorted(only["history"]) == [1, 2]
    assert [only["history"][r["step"]]["loss"] for r in records] == [r["loss"] for r in records]


def test_wandb_refusing_the_run_says_how_to_go_on(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))
    recipe = load_recipe(TINY, ["logging.wandb={project: p, mode: online}"])
    with pytest.raises(ConfigError, match=r"logging.wandb: W&B cannot open run encoder-\w+ "
                                          r"\(run-encoder\) of .*logging.wandb.mode=offline"):
        with wandb_logging.member_wandb(recipe, tmp_path / "run" / "encoder", logged=[]):
            pass
