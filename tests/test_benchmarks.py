"""benchmarks/accelerator.py (`make bench`) on the CPU: without an accelerator it says so and runs
the tiny version of the same code paths; every table row is there, the numbers are sane, and
--write replaces only its own section of the docs. No speed is asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from ettin_jax.config import load_recipe
from ettin_jax.models.attention import IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One CPU run of the script with --write into a copy of docs/benchmarks.md."""
    tmp = tmp_path_factory.mktemp("bench")
    docs = tmp / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Before\n\nkept\n\n" + accelerator.SECTION
                    + "\n\nold text\n\n## After\n\nalso kept\n")
    captured = {}
    stdout, stderr = sys.stdout, sys.stderr
    import io

    # The tiny recipe at 2 layers (one global, one local) instead of 4: the same code paths,
    # half the train steps' tracing and compiling.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(accelerator, "load_recipe",
                        lambda path: load_recipe(path, ["model.num_layers=2"]))
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        captured["results"] = accelerator.main(["--json", str(tmp / "out.json"), "--write",
                                                "--docs", str(docs)])
        captured["stdout"], captured["stderr"] = sys.stdout.getvalue(), sys.stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        monkeypatch.undo()
    captured["json"] = json.loads((tmp / "out.json").read_text())
    captured["docs"] = docs.read_text()
    return captured


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_without_an_accelerator_it_says_so_and_times_every_case(cpu_run):
    assert "no accelerator" in cpu_run["stderr"]
    results = cpu_run["results"]
    assert results["provenance"]["accelerator"] is False
    attention = {(r["seq"], r["mask"], r["impl"]): r for r in results["attention"]}
    expected = {(128, mask, impl) for mask in accelerator.CASES for impl in IMPLEMENTATIONS}
    assert set(attention) == expected and len(results["attention"]) == len(expected)
    for (_, _, impl), row in attention.items():
        assert row["device"] == "cpu" and row["jax"]
        if impl in ("cudnn", "splash", "pallas"):
            assert row["status"].startswith("n/a") and row["ms"] is None
        else:
            assert row["status"] == "ok", row
            assert _positive(row["ms"]) and _positive(row["tflops"])
    # Denser masks do more work: global sees every pair, causal about half, local (window
    # 128 > S) all of them too, so FLOP/s ratio == time ratio inverse times pair ratio.
    assert attention[(128, "global causal", "xla")]["tflops"] * \
        attention[(128, "global causal", "xla")]["ms"] < \
        attention[(128, "global bidirectional", "xla")]["tflops"] * \
        attention[(128, "global bidirectional", "xla")]["ms"]


def test_train_rows_cover_both_members_and_phases(cpu_run):
    train = cpu_run["results"]["train"]
    assert [(r["model"], r["phase"], r["member"]) for r in train] == [
        ("tiny", phase, member) for phase in accelerator.PHASES
        for member in ("encoder", "decoder")]
    for row in train:
        assert row["status"] == "ok", row
        assert (row["seq"], row["rows"], row["device"]) == (128, 2, "cpu")
        assert _positive(row["step_ms"]) and _positive(row["compile_s"])
        assert row["tokens_per_s"] == pytest.approx(row["rows"] * row["seq"]
                                                    / (row["step_ms"] / 1e3))
        assert row["mfu"] is None  # no known peak for a CPU
        assert 1 <= row["timed_steps"] <= 2 and row["flops_per_token"] > 0


def test_tables_json_and_docs_section(cpu_run):
    stdout, results = cpu_run["stdout"], cpu_run["results"]
    table_rows = [line for line in stdout.splitlines()
                  if line.startswith("| cpu |")]
    assert len(table_rows) == len(results["attention"]) + len(results["train"])
    assert cpu_run["json"]["train"] == json.loads(json.dumps(results["train"]))
    docs = cpu_run["docs"]
    assert "## Before\n\nkept" in docs and "## After\n\nalso kept" in docs
    assert "old text" not in docs and docs.count(accelerator.SECTION) == 1
    assert "Not yet measured: no accelerator has been lent" in docs
    assert all(line in docs for line in table_rows)
    assert docs.index(accelerator.SECTION) < docs.index("## After")
