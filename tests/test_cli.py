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
    if command == ["lm-eval"]:  # ours, then lm-eval's own help, and status 0
        assert main([*command, "--help"]) == 0
    else:
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


# --- the command line as a new user types it ---------------------------------------------------

ONE_PHASE = Path(__file__).resolve().parent / "recipes" / "tiny-one-phase.yaml"


def test_overrides_go_anywhere_after_the_subcommand(capsys):
    import json

    for argv in (["train", str(RECIPES / "tiny.yaml"), "--dry-run", "train.tokens=5000",
                  "--json", "phases.2.train.tokens=777"],
                 ["train", "--json", str(RECIPES / "tiny.yaml"), "train.tokens=5000",
                  "--dry-run", "phases.2.train.tokens=777"]):
        assert main(argv) == 0
        phases = json.loads(capsys.readouterr().out)["members"]["encoder"]["phases"]
        assert [p["tokens"] for p in phases] == [5000, 150_000, 777]
    assert main(["describe", "tiny", "--json", "train.seq_len=64"]) == 0
    assert "64" in json.dumps(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("argv, message", [
    (["train", "R.yaml", "--run_dir", "r"], "unrecognized option '--run_dir'. Did you mean "
                                            "'--run-dir'?"),
    (["train", "R.yaml", "--train.steps=5"], "'--train.steps=5': recipe overrides take no "
                                             "dashes; write train.steps=5"),
    (["train", "R.yaml", "--dry-run", "run-dir=r"], "'run-dir=r' is not a recipe override "
                                                   "(those are dotted keys such as "
                                                   "train.steps=5); for the option write "
                                                   "--run-dir r"),
    (["train", "R.yaml", "--dry-run", "only=encoder"], "'only=encoder' is not a recipe "
                                                      "override (those are dotted keys such as "
                                                      "train.steps=5); for the option write "
                                                      "--only encoder"),
    (["eval", "RUN", "--json", "stray"], "unrecognized arguments: stray"),
])
def test_option_typos_get_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"ettin-jax {argv[0]}: error: {message}" in err and "Traceback" not in err


def test_missing_inputs_name_the_command_that_creates_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's relative paths (runs/demo/...) do not exist here
    assert main(["train", str(RECIPES / "tiny.yaml"), "--run-dir", "r"]) == 2
    err = capsys.readouterr().err
    assert ("ettin-jax train: error: data.sources.0: prepared data runs/demo/data does not "
            "exist; prepare it with `ettin-jax data prepare SOURCE... --tokenizer "
            "TOKENIZER_DIR --out runs/demo/data` (for the demo, `make demo-data` creates it)"
            ) in err
    assert not (tmp_path / "r").exists()  # a failed start leaves no recipe behind
    assert main(["train", str(ONE_PHASE), "data.tokenizer=tok", "--run-dir", "r"]) == 2
    assert ("data.tokenizer: tok does not exist; train a tokenizer there with `ettin-jax "
            "tokenizer train [SOURCE...] --vocab-size N --out tok`") in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.yaml").write_text("train: {steps: 3}\n")
    for command in (["eval", "r"], ["export", "r"], ["fill-mask", "r", "a [MASK]"],
                    ["generate", "r", "a"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ettin-jax {command[0]}: error: r: no checkpoint here")
        assert "train the pair first: `ettin-jax train r/recipe.yaml --run-dir r`" in err
    assert main(["fill-mask", "runs/demo", "a [MASK]"]) == 2
    assert ("runs/demo does not exist; train the pair first: `ettin-jax train RECIPE --run-dir "
            "runs/demo` (for the demo, `make demo` creates it)") in capsys.readouterr().err


def test_a_machine_without_a_tpu_starts_quietly(tokenizer_dir, tmp_path):
    """`make install` brings libtpu; on a machine without a TPU a command that starts JAX
    (here: a one-step training run, JAX_PLATFORMS unset) prints none of libtpu's start-up
    errors, and training-only recipes may leave held-out data out."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, "-m", "ettin_jax", "train", str(ONE_PHASE), "--run-dir",
         str(tmp_path / "run"), "train.steps=1", "model.num_layers=1", "train.seq_len=32",
         "train.global_batch_size=2", f"data.tokenizer={tokenizer_dir}", "--only", "decoder",
         "data.heldout=[]", "logging.eval_every_steps=1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "decoder: step 1," in result.stdout
    for noise in ("E0000", "TPU_WORKER_HOSTNAMES", "TPU accelerator", "libtpu"):
        assert noise not in result.stderr, result.stderr
    assert "data.heldout is empty: training without held-out evaluation" in result.stderr


@pytest.fixture
def restores_compilation_cache():
    """The test process's compilation cache settings, put back after a test that changes them."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_train_writes_the_compilation_cache(tokenizer_dir, tmp_path,
                                            restores_compilation_cache, capsys):
    """`train --compilation-cache DIR` writes the programs it compiles into DIR. A sequence
    length no other test uses: programs this process compiled before would come from memory
    and reach no disk cache."""
    cache = tmp_path / "cache"
    assert main(["train", str(ONE_PHASE), "train.steps=1", "model.num_layers=1",
                 "train.seq_len=40", "train.global_batch_size=8",
                 f"data.tokenizer={tokenizer_dir}", "--only", "decoder", "data.heldout=[]",
                 "--run-dir", str(tmp_path / "run"), "--compilation-cache", str(cache)]) == 0
    assert "decoder: step 1," in capsys.readouterr().out
    assert len(list(cache.iterdir())) > 0


def test_compilation_cache_directory_and_off(tmp_path, restores_compilation_cache):
    """The option wins over ETTIN_JAX_COMPILATION_CACHE, which wins over JAX's own directory,
    then the XDG default; "off"/"0" disable it, and a disabled cache writes nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ettin_jax.compilation_cache import cache_directory, enable_compilation_cache

    env = {"ETTIN_JAX_COMPILATION_CACHE": "/e", "JAX_COMPILATION_CACHE_DIR": "/j",
           "XDG_CACHE_HOME": "/x"}
    assert cache_directory("/o", env) == "/o"
    assert cache_directory(None, env) == "/e"
    assert cache_directory("off", env) is None
    assert cache_directory(None, {**env, "ETTIN_JAX_COMPILATION_CACHE": "OFF"}) is None
    assert cache_directory(None, {**env, "ETTIN_JAX_COMPILATION_CACHE": "0"}) is None
    assert cache_directory(None, {"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    assert cache_directory(None, {"XDG_CACHE_HOME": "/x"}) == "/x/ettin-jax/jax"
    for name, directory in (("on", tmp_path / "on"), ("off", None)):
        enable_compilation_cache(directory)
        if directory is None:  # where JAX would write if the cache were on
            jax.config.update("jax_compilation_cache_dir", str(tmp_path / name))
        scale = float(np.random.default_rng().normal())  # a program no process compiled
        jax.jit(lambda x: jnp.sin(x) * scale)(jnp.ones(3)).block_until_ready()
        written = list((tmp_path / name).iterdir()) if (tmp_path / name).exists() else []
        assert bool(written) == (name == "on"), written
