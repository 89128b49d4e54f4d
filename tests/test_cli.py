"""The `ettin-jax` command line: help everywhere, both entry points, clean errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ettin_jax.cli import build_parser, main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _subcommands() -> list[str]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(commands.choices)


@pytest.mark.parametrize("command", [[], *[[c] for c in _subcommands()]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: ettin-jax" in capsys.readouterr().out


def test_module_and_console_script_run():
    module = subprocess.run([sys.executable, "-m", "ettin_jax", "--help"],
                            capture_output=True, text=True, env=ENV)
    assert module.returncode == 0 and "describe" in module.stdout
    script = shutil.which("ettin-jax", path=str(Path(sys.executable).parent))
    assert script, "console script ettin-jax is not installed next to the interpreter"
    result = subprocess.run([script, "recipe", str(RECIPES / "tiny.yaml"), "train.steps=3"],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "steps: 3" in result.stdout


def test_describe_table(capsys):
    assert main(["describe", str(RECIPES / "tiny.gin")]) == 0
    out = capsys.readouterr().out
    assert "encoder (mlm)" in out and "decoder (clm)" in out and "GllG" in out
    assert "at seq_len 128, MLM mask ratio 0.3" in out
    assert main(["describe", str(RECIPES / "tiny.yaml"), "--phase", "decay"]) == 0
    assert "at seq_len 256, MLM mask ratio 0.15" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["describe", "ettin-15m"], "Did you mean 'ettin-150m'"),
    (["describe", "tiny", "train.stepz=1"], "Did you mean 'steps'"),
    (["recipe", "no/such/recipe.yaml"], "does not exist"),
    (["describe", str(RECIPES / "tiny.yaml"), "--phase", "warmup"],
     "no phase 'warmup' in the recipe; its phases: pretrain, extension, decay"),
    (["train", str(RECIPES / "tiny.yaml"), "phases.2.kind=pretrain", "--dry-run"], "phases out of order"),
    (["train", str(RECIPES / "tiny.yaml"), "phases.1.train.seqlen=8", "--dry-run"],
     "Did you mean 'seq_len'"),
])
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ettin-jax {argv[0]}: error:") and fragment in err
    assert "Traceback" not in err
