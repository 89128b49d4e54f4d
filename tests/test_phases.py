"""Multi-phase runs and what users do with a finished run: phase transitions and their reset
rules, phase-end checkpoints, the run directory's recipe check, `train --dry-run`, and the
eval / fill-mask / generate / plot / export subcommands on a trained pair."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ettin_jax.cli import main
from ettin_jax.config import load_recipe
from ettin_jax.errors import ConfigError
from ettin_jax.training.checkpoint import PHASE_END, TrainCheckpointer, restore_weights
from ettin_jax.training.metrics import read_metrics
from ettin_jax.training.optimizer import make_optimizer
from ettin_jax.training.run_dir import claim_run_dir, recipe_differences
from ettin_jax.training.schedules import learning_rate_schedule
from ettin_jax.training.state import abstract_state, init_state_shardings
from ettin_jax.training.trainer import train_pair

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ONE_PHASE = ROOT / "tests" / "recipes" / "tiny-one-phase.yaml"
# Three short phases: seq 64 -> 96, the second resets the optimizer, the third keeps it and
# restarts the learning rate at half the peak with 15% masking, and the decoder alone takes
# another local-layer RoPE base there (as Ettin's decoder decay configs of some sizes).
PHASES = ("phases=[{name: warm, kind: pretrain, train: {steps: 3}},"
          " {name: long, kind: extension, optimizer_state: reset,"
          "  train: {steps: 2, seq_len: 96}, model: {global_rope_theta: 40000.0},"
          "  schedule: {warmup_tokens: 0, decay_tokens: null, floor: 0.5}},"
          " {name: cool, kind: decay, train: {steps: 2},"
          "  schedule: {start: 0.5, decay_tokens: null, floor: 0.02},"
          "  data: {mlm_mask_ratio: 0.15}, decoder: {model: {local_rope_theta: 5000.0}}}]")
SMALL = ["train.seq_len=64", "train.global_batch_size=8", "model.num_layers=2",
         "logging.every_steps=1", "checkpoint.every_steps=100", "checkpoint.keep=1",
         "schedule.warmup_tokens=300", "schedule.decay_tokens=0"]


def _recipe(tokenizer_dir, *extra):
    return load_recipe(ONE_PHASE, [*SMALL, PHASES, f"data.tokenizer={tokenizer_dir}", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir):
    """A pair trained through three phases (7 steps each member)."""
    run_dir = tmp_path_factory.mktemp("run")
    results = train_pair(_recipe(tokenizer_dir), run_dir)
    assert {m: (r.step, r.stopped) for m, r in results.items()} == \
        {"encoder": (7, None), "decoder": (7, None)}
    return run_dir


def test_phases_run_in_order_with_their_reset_rules(trained_run, tokenizer_dir):
    recipe = _recipe(tokenizer_dir)
    peak = recipe.optimizer.learning_rate
    for member in ("encoder", "decoder"):
        records = read_metrics(trained_run / member)
        assert [r["step"] for r in records] == list(range(1, 8))
        assert [r["phase"] for r in records] == ["warm"] * 3 + ["long"] * 2 + ["cool"] * 2
        # Each phase's schedule runs on the phase's own tokens, from its own start.
        for phase in recipe.phases:
            mine = [r for r in records if r["phase"] == phase.name]
            schedule = learning_rate_schedule(phase.schedule, peak=peak,
                                              total_tokens=phase.train.steps * 8 * phase.train.seq_len)
            seen = 0
            for r in mine:
                assert r["learning_rate"] == pytest.approx(float(schedule(seen)), rel=1e-6)
                seen = r["phase_tokens"]
        long_rows = [r for r in records if r["phase"] == "long"]
        assert long_rows[0]["learning_rate"] == pytest.approx(peak, rel=1e-6)  # no warmup
        cool = [r for r in records if r["phase"] == "cool"]
        assert cool[0]["learning_rate"] == pytest.approx(0.5 * peak, rel=1e-6)
        # Tokens: the budget counters restart per phase, the member's total goes on.
        assert records[3]["phase_tokens"] < records[3]["tokens"]
        assert records[-1]["tokens"] == sum(
            r["phase_tokens"] for r in records if r is records[2] or r is records[4]) \
            + records[-1]["phase_tokens"]

        # keep=1, but every phase's last step stays, marked; each holds its phase's position.
        steps = sorted(int(p.name) for p in (trained_run / member / "checkpoints").iterdir())
        assert steps == [3, 5, 7]
        assert [(trained_run / member / "checkpoints" / str(s) / PHASE_END).read_text().strip()
                for s in steps] == ["warm", "long", "cool"]
        # Member changes apply to their member and phase only.
        thetas = [restore_weights(trained_run / member, step=s).model.config.local_rope_theta
                  for s in steps]
        assert thetas == [10000.0, 10000.0, 5000.0 if member == "decoder" else 10000.0]

    # The optimizer state: fresh at "long" (2 updates in it), kept through "cool" (4).
    checkpoints = TrainCheckpointer(trained_run / "encoder", recipe.checkpoint)
    from ettin_jax.training.mesh import make_mesh

    mesh = make_mesh(recipe.mesh)
    optimizer = make_optimizer(recipe.optimizer)
    counts = {}
    for step, phase in [(3, recipe.phases[0]), (5, recipe.phases[1]), (7, recipe.phases[2])]:
        target = abstract_state(init_state_shardings(phase.model, "mlm", optimizer, mesh),
                                phase.model, "mlm", optimizer)
        state, progress, _ = checkpoints.restore(step, target)
        counts[step] = int(np.max([np.asarray(leaf) for path, leaf in
                                   jax.tree_util.tree_leaves_with_path(state.opt_state)
                                   if "count" in jax.tree_util.keystr(path)]))
        assert (int(state.step), progress["phase_name"], progress["phase_step"]) == \
            (step, phase.name, {3: 3, 5: 2, 7: 2}[step])
    checkpoints.close()
    assert counts == {3: 3, 5: 2, 7: 4}


def test_a_finished_run_resumes_to_nothing_and_refuses_another_recipe(trained_run,
                                                                        tokenizer_dir):
    results = train_pair(_recipe(tokenizer_dir), trained_run)
    assert {m: r.step for m, r in results.items()} == {"encoder": 7, "decoder": 7}
    assert len(read_metrics(trained_run / "encoder")) == 7
    with pytest.raises(ConfigError, match=r"phases.1.train.seq_len: 96 -> 128.*--force"):
        train_pair(_recipe(tokenizer_dir, "phases.1.train.seq_len=128"), trained_run)


def test_run_dir_accepts_resume_compatible_changes_only(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert claim_run_dir(tmp_path, recipe) == {}
    # Before any checkpoint, a failed start holds nobody to its recipe.
    other = load_recipe(RECIPES / "tiny.yaml", ["train.seq_len=64"])
    assert claim_run_dir(tmp_path, other) == {}
    assert load_recipe(tmp_path / "recipe.yaml") == other
    assert claim_run_dir(tmp_path, recipe) == {}
    (tmp_path / "decoder" / "checkpoints" / "3").mkdir(parents=True)  # from now on it does
    moved = load_recipe(RECIPES / "tiny.yaml", ["mesh.data=2", "logging.every_steps=1",
                                                "phases.2.model.attention_impl=pallas",
                                                "model.scan_layers=true"])
    assert set(claim_run_dir(tmp_path, moved)) == {
        "mesh.data", "logging.every_steps", "phases.2.model.attention_impl",
        "model.scan_layers", *(f"phases.{i}.model.scan_layers" for i in range(3))}
    assert load_recipe(tmp_path / "recipe.yaml") == moved  # what the run now is
    for change in ["train.seq_len=64", "phases.2.data.mlm_mask_ratio=0.2",
                   "phases=[{name: only}]", "model.num_layers=2"]:
        other = load_recipe(RECIPES / "tiny.yaml", ["mesh.data=2", "logging.every_steps=1",
                                                    "phases.2.model.attention_impl=pallas",
                                                    "model.scan_layers=true", change] if "phases=" not in change
                            else [change])
        with pytest.raises(ConfigError, match="holds a run of another recipe"):
            claim_run_dir(tmp_path, other)
    forced = load_recipe(RECIPES / "tiny.yaml", ["train.seq_len=64"])
    assert "train.seq_len" in claim_run_dir(tmp_path, forced, force=True)
    assert recipe_differences(load_recipe(tmp_path / "recipe.yaml"), forced) == {}


@pytest.mark.parametrize("name", ["tiny", "ettin-150m"])
def test_dry_run_prints_both_members_and_yaml_equals_gin(name, capsys):
    outputs = []
    for suffix in ("yaml", "gin"):
        assert main(["train", str(RECIPES / f"{name}.{suffix}"), "--dry-run", "--json"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    plan = json.loads(outputs[0])
    assert set(plan["members"]) == {"encoder", "decoder"}
    encoder = plan["members"]["encoder"]
    assert [p["name"] for p in encoder["phases"]] == ["pretrain", "extension", "decay"]
    assert [p["mlm_mask_ratio"] for p in encoder["phases"]] == [0.3, 0.3, 0.15]
    assert encoder["recipe"]["train"]["objectives"] == ["mlm"]
    assert plan["members"]["decoder"]["recipe"]["phases"][2]["train"]["objectives"] == ["clm"]
    assert plan["describe"]["encoder"]["params"] == plan["describe"]["decoder"]["params"]
    if name == "ettin-150m":
        assert [p["seq_len"] for p in encoder["phases"]] == [1024, 7999, 7999]
        assert encoder["phases"][2]["learning_rate_end"] == pytest.approx(0.02 * 8e-4)
    assert main(["train", str(RECIPES / f"{name}.yaml"), "--dry-run", "--only", "decoder"]) == 0
    text = capsys.readouterr().out
    assert "decoder (clm):" in text and "encoder (mlm):" not in text
    assert "extension" in text and "train FLOPs/token" in text and "phases:" in text


def test_train_without_run_dir_is_an_error(capsys):
    assert main(["train", str(RECIPES / "tiny.yaml")]) == 2
    assert "--run-dir" in capsys.readouterr().err


def test_eval_reproduces_the_trainers_held_out_numbers(trained_run, capsys):
    assert main(["eval", str(trained_run), "--batches", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"encoder", "decoder"}
    for member, result in results.items():
        assert (result["step"], result["phase"]) == (7, "cool")
        assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]))
        assert 0 < result["eval_accuracy"] < 1 and result["eval_targets"] > 0
    assert main(["eval", str(trained_run), "--batches", "1"]) == 0
    assert "encoder (step 7, phase cool): held-out loss" in capsys.readouterr().out
    # Overrides change the run's recipe for the evaluation: other held-out data, or none.
    assert main(["eval", str(trained_run), "--json", "data.heldout=[{path: bundled}]",
                 "--batches", "1"]) == 0
    on_train = json.loads(capsys.readouterr().out)
    assert on_train["decoder"]["eval_loss"] != results["decoder"]["eval_loss"]
    assert main(["eval", str(trained_run), "data.heldout=[]"]) == 2
    assert (f"{trained_run / 'recipe.yaml'}: data.heldout is empty (phase 'cool'): there is "
            f"nothing to evaluate on") in capsys.readouterr().err


def test_fill_mask_generate_plot_and_export_on_a_run(trained_run, capsys, tmp_path):
    assert main(["fill-mask", str(trained_run), "the [MASK] of the [MASK]", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[MASK] 1", "[MASK] 2"]
    assert main(["generate", str(trained_run), "To be", "--max-new-tokens", "5"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("To be")
    assert main(["generate", str(trained_run), "To be", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    # The members are what the subcommands say they are.
    assert main(["fill-mask", str(trained_run / "decoder"), "a [MASK]"]) == 2
    assert "holds a clm model, not the encoder" in capsys.readouterr().err

    assert main(["plot", str(trained_run)]) == 0
    assert "encoder 7 records, decoder 7 records" in capsys.readouterr().out
    assert (trained_run / "plots" / "training.png").stat().st_size > 10_000

    assert main(["export", str(trained_run)]) == 0
    assert "encoder: " in capsys.readouterr().out
    for member in ("encoder", "decoder"):
        hf = trained_run / member / "hf"
        assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
    # An exported directory serves the same model.
    assert main(["generate", str(trained_run / "decoder" / "hf"), "To be",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == greedy


def test_tiny_cross_objective_recipe_starts_from_the_other_member(trained_run, tmp_path):
    from ettin_jax.training.checkpoint import restore_weights
    from ettin_jax.training.resume import _initial_params

    recipe = load_recipe(RECIPES / "tiny-enc2dec.yaml", [
        *SMALL, "data.sources=[{path: bundled}]", "data.heldout=[{path: bundled}]",
        f"data.tokenizer={trained_run / 'encoder' / 'tokenizer'}",
        f"checkpoint.init_from={trained_run / 'encoder'}", "train.steps=1"])
    assert recipe.train.objectives == ("clm",) and recipe.schedule.start == 0.5
    params = _initial_params(recipe, "clm")
    encoder = restore_weights(trained_run / "encoder")
    from flax import nnx

    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(encoder.model, nnx.Param)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    results = train_pair(recipe, tmp_path)
    assert list(results) == ["decoder"] and results["decoder"].step == 1
