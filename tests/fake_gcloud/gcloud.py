"""A fake `gcloud` for the TPU launcher's tests: records every call and plays a queued resource.

Run as `python gcloud.py ARGS...` (tests put a `gcloud` wrapper first on PATH). Its folder is
$FAKE_GCLOUD_DIR, holding:
  scenario.json  what happens (every key optional):
                   waiting_polls: describes answering WAITING_FOR_RESOURCES before ACTIVE (0)
                   stuck_state:   a state describe always answers (e.g. FAILED: no capacity)
                   train_failures: runs of `ettin-jax train` that fail, the slice turning
                                   SUSPENDED (a preemption) (0)
                   create_error:  create fails with this message
  calls.jsonl    one {"argv": [...], "stdin": text or null} per call (written here)
  state.json     the queued resource (written here)
  uploads/       what `gcloud storage cp` received, by file name (written here)
It understands only the commands the launcher runs; anything else exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _option(argv: list[str], name: str) -> str | None:
    for index, word in enumerate(argv):
        if word == name:
            return argv[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    folder = Path(os.environ["FAKE_GCLOUD_DIR"])
    stdin = sys.stdin.read() if "-" in argv else None
    with open(folder / "calls.jsonl", "a") as calls:
        calls.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
    scenario_file = folder / "scenario.json"
    scenario = json.loads(scenario_file.read_text()) if scenario_file.exists() else {}
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {
        "exists": False, "polls": 0, "state": None, "train_runs": 0}

    def save() -> None:
        state_file.write_text(json.dumps(state))

    if argv[:2] == ["storage", "cp"]:
        sources, dest = argv[2:-1], argv[-1]
        uploads = folder / "uploads"
        uploads.mkdir(exist_ok=True)
        for source in sources:
            name = dest.rsplit("/", 1)[-1] if source == "-" else Path(source).name
            if source == "-":
                (uploads / name).write_text(stdin)
            elif not Path(source).is_file():
                print(f"ERROR: {source} not found", file=sys.stderr)
                return 1
            else:
                (uploads / name).write_bytes(Path(source).read_bytes())
        return 0
    if argv[:3] == ["compute", "tpus", "queued-resources"]:
        verb, name = argv[3], argv[4]
        if verb == "create":
            if scenario.get("create_error"):
                print(f"ERROR: (gcloud) {scenario['create_error']}", file=sys.stderr)
                return 1
            if state["exists"]:
                print(f"ERROR: (gcloud) ALREADY_EXISTS: {name}", file=sys.stderr)
                return 1
            state.update(exists=True, polls=0, state="WAITING_FOR_RESOURCES")
            save()
            return 0
        if not state["exists"]:
            print(f"ERROR: (gcloud) NOT_FOUND: {name}", file=sys.stderr)
            return 1
        if verb == "describe":
            state["polls"] += 1
            if scenario.get("stuck_state"):
                state["state"] = scenario["stuck_state"]
            elif (state["state"] == "WAITING_FOR_RESOURCES"
                  and state["polls"] > scenario.get("waiting_polls", 0)):
                state["state"] = "ACTIVE"
            save()
            print(state["state"])
            return 0
        if verb == "delete":
            state.update(exists=False, state=None)
            save()
            return 0
    if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        command = _option(argv, "--command")
        if not state["exists"] or state["state"] != "ACTIVE" or command is None:
            print("ERROR: (gcloud) the TPU is not reachable", file=sys.stderr)
            return 255
        if "ettin-jax train" in command:
            state["train_runs"] += 1
            if state["train_runs"] <= scenario.get("train_failures", 0):
                state["state"] = "SUSPENDED"
                save()
                print("worker 3: connection closed by remote host", file=sys.stderr)
                return 255
            save()
            print("training: done")
        return 0
    print(f"fake gcloud: unknown command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
