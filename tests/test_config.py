"""Recipes: YAML and gin give the same typed tree, overrides apply, and every kind of bad input
fails before compilation with the file, the key path and the valid choices."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from data_pipelines.microbatches import microbatch_rows
from ettin_jax.config import (
    ConfigError,
    Recipe,
    load_recipe,
    recipe_from_preset,
    recipe_to_dict,
    recipe_to_yaml,
)
from ettin_jax.models import get_preset
from ettin_jax.models.config import RUNTIME_MODEL_FIELDS, model_differences

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("name", ["tiny", "ettin-150m"])
def test_yaml_and_gin_are_the_same_recipe(name):
    from_yaml = load_recipe(RECIPES / f"{name}.yaml")
    from_gin = load_recipe(RECIPES / f"{name}.gin")
    assert from_yaml == from_gin
    assert len(from_yaml.phases) == 3


def test_tiny_recipe():
    from_yaml = load_recipe(RECIPES / "tiny.yaml")
    assert from_yaml.model == dataclasses.replace(get_preset("tiny"), global_rope_theta=1e4)
    assert from_yaml.optimizer.learning_rate == pytest.approx(3e-3)  # "3e-3" read as a float


def test_public_contract_names_exist_and_override():
    overrides = ["train.steps=7", "train.global_batch_size=4", "train.seq_len=64",
                 "train.seed=5", "checkpoint.every_steps=3", "mesh.data=2", "mesh.fsdp=4",
                 "model.preset=ettin-17m"]
    recipe = load_recipe(RECIPES / "tiny.yaml", overrides)
    assert (recipe.train.steps, recipe.train.global_batch_size, recipe.train.seq_len,
            recipe.train.seed) == (7, 4, 64, 5)
    assert recipe.checkpoint.every_steps == 3
    assert (recipe.mesh.data, recipe.mesh.fsdp) == (2, 4)
    assert recipe.model == get_preset("ettin-17m")


def test_model_fields_override_the_preset(tmp_path):
    path = _write(tmp_path, "r.yaml", """
        model: {preset: tiny, num_layers: 5, global_layers: [0, 4]}
    """)
    model = load_recipe(path, ["model.local_rope_theta=5e3"]).model
    assert model.num_layers == 5 and model.global_layers == (0, 4)
    assert model.layer_types == ("global", "local", "local", "local", "global")
    assert model.local_rope_theta == 5000.0
    assert model.hidden_size == get_preset("tiny").hidden_size


def test_recipe_is_frozen_and_typed():
    recipe = load_recipe(RECIPES / "tiny.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.steps = 3  # type: ignore[misc]
    assert isinstance(recipe.train.objectives, tuple)
    assert type(load_recipe(RECIPES / "tiny.yaml", ["schedule.warmup_tokens=1.0e6"])
                .schedule.warmup_tokens) is int


def test_round_trip_through_yaml(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["optimizer.clip_grad_norm=1.0"])
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe
    resolved = recipe_to_dict(recipe)["phases"]
    assert [p["name"] for p in resolved] == ["pretrain", "extension", "decay"]
    assert resolved[2]["optimizer"]["clip_grad_norm"] == 1.0  # inherited through the phases


def test_phases_inherit_from_the_phase_before(tmp_path):
    path = _write(tmp_path, "r.yaml", """
        model: {preset: tiny, global_rope_theta: 10000.0}
        train: {tokens: 1000, steps: null, seq_len: 64}
        data: {mlm_mask_ratio: 0.3}
        phases:
          - {name: pretrain, kind: pretrain}
          - name: long
            kind: extension
            model: {global_rope_theta: 160000.0}
            train: {seq_len: 128, tokens: 500}
            optimizer_state: reset
          - name: decay
            kind: decay
            data: {mlm_mask_ratio: 0.15}
    """)
    recipe = load_recipe(path, ["phases.2.train.tokens=200"])
    pretrain, long, decay = recipe.phases
    assert pretrain.train == recipe.train and pretrain.model == recipe.model
    assert (long.train.seq_len, long.train.tokens, long.model.global_rope_theta) == \
        (128, 500, 160000.0)
    assert long.data.mlm_mask_ratio == 0.3 and long.optimizer_state == "reset"
    # The decay phase starts from the extension's sections, not the top level's; the kind of
    # phase and its optimizer rule are its own.
    assert (decay.train.seq_len, decay.train.tokens, decay.model.global_rope_theta) == \
        (128, 200, 160000.0)
    assert (decay.data.mlm_mask_ratio, decay.optimizer_state) == (0.15, "keep")
    assert recipe.run_phases() == recipe.phases
    assert load_recipe(path, ["phases=[]"]).run_phases()[0].train == recipe.train
    single = recipe.phase_recipe(long)
    assert (single.phases, single.train, single.model) == ((), long.train, long.model)


def test_gin_phases_and_list_override(tmp_path):
    path = _write(tmp_path, "r.gin", """
        model.preset = 'tiny'
        train.seq_len = 64
        recipe.phases = [@pretrain/phase(), @decay/phase()]
        pretrain/phase.name = 'pretrain'
        pretrain/phase.kind = 'pretrain'
        pretrain/phase.train = {'steps': 10}
        decay/phase.name = 'decay'
        decay/phase.kind = 'decay'
        decay/phase.train = {'steps': 3}
        decay/phase.data = {'mlm_mask_ratio': 0.15}
    """)
    recipe = load_recipe(path, ["phases.1.train.steps=5"])
    assert [(p.name, p.train.steps, p.train.seq_len, p.data.mlm_mask_ratio)
            for p in recipe.phases] == [("pretrain", 10, 64, 0.3), ("decay", 5, 64, 0.15)]


def test_errors_carry_the_line_of_the_key(tmp_path):
    yaml_path = _write(tmp_path, "r.yaml", """
        model:
          preset: tiny
        phases:
          - name: a
          - name: b
            train:
              seq_len: 1
    """)
    assert f"{yaml_path}:8: phases.1.train.seq_len: seq_len must be >= 2" in _error(yaml_path)
    gin_path = _write(tmp_path, "r.gin", """
        model.preset = 'tiny'

        train.seq_len = 1
    """)
    assert f"{gin_path}:4: train.seq_len" in _error(gin_path)


def test_defaults_and_presets():
    assert load_recipe() == Recipe()
    assert recipe_from_preset("ettin-150m").model == get_preset("ettin-150m")
    assert recipe_from_preset("tiny", ["train.steps=3"]).train.steps == 3


@pytest.mark.parametrize("text, expected", [
    ("train:\n  stepz: 3\n", ["r.yaml", "unknown key 'train.stepz'", "Did you mean 'steps'",
                              "global_batch_size"]),
    ("trian:\n  steps: 3\n", ["unknown key 'trian'", "Did you mean 'train'"]),
    ("train:\n  steps: three\n", ["r.yaml", "train.steps", "expected int", "'three'"]),
    ("train:\n  steps: 0\n", ["train", "steps must be >= 1, got 0"]),
    ("optimizer:\n  name: adamm\n", ["optimizer.name", "'adamm'", "Did you mean 'adamw'",
                                     "stable_adamw"]),
    ("model:\n  preset: ettin-15m\n", ["model.preset", "ettin-150m"]),
    ("model:\n  preset: tiny\n  num_heads: 3\n", ["hidden_size 128", "num_heads 3"]),
    ("model:\n  preset: tiny\n  global_layers: [0, 9]\n", ["global_layers", "[9]",
                                                           "num_layers = 4"]),
    ("model:\n  preset: tiny\n  local_attention: 7\n", ["local_attention", "got 7"]),
    ("model:\n  attention_impl: flash\n", ["model.attention_impl", "xla, pallas, cudnn"]),
    ("mesh:\n  data: -1\n  fsdp: -1\n", ["at most one of mesh.data and mesh.fsdp"]),
    ("train:\n  objectives: [mlm, mlm]\n", ["objectives"]),
    ("train: 3\n", ["train", "expected a mapping"]),
    ("train:\n  steps: 3\n  steps: 4\n", ["r.yaml", "duplicate key 'steps'"]),
    ("train: [steps: 3\n", ["r.yaml", "invalid YAML"]),
    ("- 1\n- 2\n", ["r.yaml", "must be a mapping of sections"]),
    ("phases:\n  - {name: a}\n  - {name: a}\n", ["names must be unique"]),
    ("phases:\n  - {kind: pretrain}\n", ["r.yaml:2", "phases.0", "missing required key(s): name"]),
    ("phases:\n  - {name: a, kind: decay}\n  - {name: b, kind: extension}\n",
     ["phases out of order: phases.0 ('decay') comes before phases.1 ('extension')"]),
    ("phases:\n  - {name: a}\n  - {name: b, model: {num_layers: 2}}\n",
     ["phases.1.model changes the architecture: num_layers"]),
    ("phases:\n  - {name: a}\n  - {name: b, optimizer: {name: adamw}}\n",
     ["phases.1 keeps the optimizer state of a stable_adamw optimizer but uses adamw"]),
    ("phases:\n  - {name: a}\n  - {name: b, train: {objectives: [mlm]}}\n",
     ["every phase trains the same members"]),
    ("phases:\n  - {name: a, train: {stepz: 3}}\n", ["phases.0.train.stepz", "Did you mean"]),
    ("phases: 3\n", ["phases", "expected a list of phases"]),
    ("logging:\n  tensorboard: 1\n", ["logging.tensorboard", "expected bool"]),
    ("train:\n  steps: null\n", ["steps and tokens are both null"]),
    ("train:\n  batch_warmup_tokens: 100\n", ["batch_warmup_tokens=100 needs microbatch_size"]),
    ("train:\n  microbatch_size: 4\n  max_microbatch_size: 2\n",
     ["max_microbatch_size=2 needs microbatch_size set and at most max_microbatch_size (got 4)"]),
    ("train:\n  max_microbatch_size: 8\n", ["max_microbatch_size=8 needs microbatch_size"]),
    ("schedule:\n  start: 0.5\n  floor: 0.6\n", ["floor must be in [0, start=0.5], got 0.6"]),
])
def test_bad_yaml_names_file_key_and_choices(tmp_path, text, expected):
    message = _error(_write(tmp_path, "r.yaml", text))
    for fragment in expected:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("override, expected", [
    ("train.stepz=3", ["override 'train.stepz=3'", "Did you mean 'steps'"]),
    ("train.steps=abc", ["override 'train.steps=abc'", "train.steps", "expected int"]),
    ("train.steps", ["not of the form dotted.key=value"]),
    ("train..steps=1", ["not of the form dotted.key=value"]),
    ("phases.3.name=x", ["indexes a list"]),
    ("train.seed.x=1", ["train.seed is not a section"]),
    ("model.preset=ettin-1000m", ["override 'model.preset=ettin-1000m'", "ettin-1b"]),
])
def test_bad_overrides_name_the_override(override, expected):
    message = _error(RECIPES / "tiny.yaml", [override])
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_bad_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing.yaml")
    assert "unknown recipe format '.toml'" in _error(_write(tmp_path, "r.toml", "x = 1\n"))
    assert load_recipe(_write(tmp_path, "empty.yaml", "")) == Recipe()


@pytest.mark.parametrize("text, expected", [
    ("train.stepz = 3\n", ["r.gin", "stepz", "Did you mean 'steps'"]),
    ("trian.steps = 3\n", ["r.gin", "trian", "Did you mean 'train'"]),
    ("train.steps = 'x'\n", ["r.gin", "train.steps", "expected int"]),
    ("train.steps = 3\ntrain.seq_len = \n", ["r.gin", "line 2"]),
])
def test_bad_gin_names_file_and_key(tmp_path, text, expected):
    message = _error(_write(tmp_path, "r.gin", text))
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_gin_section_bound_twice_is_an_error(tmp_path):
    path = _write(tmp_path, "r.gin", "recipe.train = @train()\ntrain.steps = 3\n")
    assert "bound both as recipe.train and as train.*" in _error(path)


def test_data_sources_in_yaml_gin_and_overrides(tmp_path):
    from ettin_jax.config import SourceConfig

    gin_path = _write(tmp_path, "r.gin", """
        data.sources = [@web/source(), @code/source()]
        web/source.path = 'web/*.jsonl'
        web/source.weight = 3.0
        code/source.path = 'code'
        code/source.documents = 'blank_lines'
        data.tokenizer = 'runs/tokenizer'
    """)
    yaml_path = _write(tmp_path, "r.yaml", """
        data:
          tokenizer: runs/tokenizer
          sources:
            - {path: "web/*.jsonl", weight: 3}
            - {path: code, documents: blank_lines}
    """)
    recipe = load_recipe(gin_path)
    assert recipe == load_recipe(yaml_path)
    assert recipe.data.sources == (SourceConfig("web/*.jsonl", weight=3.0),
                                   SourceConfig("code", documents="blank_lines"))
    assert load_recipe(yaml_path, ["data.sources.1.weight=2"]).data.sources[1].weight == 2.0
    message = _error(yaml_path, ["data.sources.0.kind=csv"])
    assert "data.sources.0.kind" in message and "jsonl" in message


# Ettin's phase 1 (Ettin's standard/<size>/*.yaml; docs/fidelity.md): peak
# LR, weight decay, LR warmup and batch-size warmup in billions of tokens.
ETTIN_PHASE_1 = {"17m": (3e-3, 3e-4, 4, 125), "32m": (3e-3, 3e-4, 4, 100),
                 "68m": (3e-3, 3e-4, 3, 75), "150m": (8e-4, 1e-5, 3, 50),
                 "400m": (5e-4, 1e-5, 2, 10), "1b": (5e-4, 5e-5, 2, 3)}
# Local-layer RoPE bases of phases 2 and 3 (encoder, decoder) where not 160k, from Ettin's
# de_decay and prolong_decay configs (local_attn_rotary_emb_base; absent = the global 160k).
ETTIN_LOCAL_ROPE = {("17m", "extension"): (10_000.0, 10_000.0),
                    ("17m", "decay"): (160_000.0, 10_000.0),
                    ("32m", "decay"): (160_000.0, 10_000.0),
                    ("68m", "decay"): (160_000.0, 10_000.0),
                    ("400m", "decay"): (160_000.0, 10_000.0)}
# Ettin's cross-train configs: learning rate (the fresh optimizer's peak) per size.
ETTIN_CROSS_LR = {"17m": 1.5e-3, "32m": 1.5e-3, "68m": 1.5e-3, "150m": 4e-4, "400m": 2.5e-4,
                  "1b": 2.5e-4}


@pytest.mark.parametrize("size", ETTIN_PHASE_1)
def test_ettin_recipes_hold_the_papers_numbers(size):
    recipe = load_recipe(RECIPES / f"ettin-{size}.yaml")
    lr, wd, warmup, batch_warmup = ETTIN_PHASE_1[size]
    assert not model_differences(recipe.model, get_preset(f"ettin-{size}"),
                                 ignore=RUNTIME_MODEL_FIELDS)
    assert (recipe.model.dtype, recipe.model.precision) == ("bfloat16", "autocast")
    assert (recipe.optimizer.name, recipe.optimizer.learning_rate, recipe.optimizer.weight_decay,
            recipe.optimizer.b1, recipe.optimizer.b2, recipe.optimizer.eps) == \
        ("stable_adamw", lr, wd, 0.9, 0.98, 1e-6)
    train, schedule = recipe.train, recipe.schedule
    # Real tokens per step as Ettin's 4608 unpacked rows (1.7T in ~600k steps).
    assert (train.tokens, train.steps, train.global_batch_tokens, train.seq_len, train.seed) == \
        (1_700_000_000_000, None, 2_833_000, 1024, 21)
    assert (train.batch_warmup_tokens, schedule.warmup_tokens) == (batch_warmup * 10**9,
                                                                   warmup * 10**9)
    assert (schedule.kind, schedule.decay_tokens, schedule.start) == ("warmup_stable_decay", 0, 1)
    assert recipe.data.mlm_mask_ratio == 0.30
    assert (recipe.data.chunking, recipe.data.mlm_masking) == ("ettin", "bernoulli")
    # Sized for 64 chips: microbatches that split over every chip; after batch warmup the full
    # batch (2880 rows at the assumed fill) runs in pieces as large as a chip holds
    # (docs/benchmarks.md): at once up to 400m, 1b in 3 microbatches of 15 rows per chip.
    assert train.microbatch_size % 64 == 0
    assert microbatch_rows(2880, train.microbatch_size, train.max_microbatch_size) == (
        960 if size == "1b" else 2880)
    # Phases 2 and 3 (Ettin's de_decay and prolong_decay configs), each from the one before.
    pretrain, extension, decay = recipe.phases
    assert (pretrain.name, pretrain.kind, pretrain.train, pretrain.schedule) == \
        ("pretrain", "pretrain", train, schedule)
    extension_tokens, decay_tokens = ((83_333_000_000, 16_666_666_667) if size == "1b"
                                      else (250_000_000_000, 50_000_000_000))
    for phase, tokens, mask, start, floor in [(extension, extension_tokens, 0.30, 1.0, 0.5),
                                              (decay, decay_tokens, 0.15, 0.5, 0.02)]:
        assert (phase.train.tokens, phase.train.seq_len, phase.train.global_batch_tokens) == \
            (tokens, 7999, 2_500_000)
        assert (phase.model.global_rope_theta, phase.data.mlm_mask_ratio) == (160_000.0, mask)
        local = tuple(recipe.for_member(m).phases[recipe.phases.index(phase)].model
                      .local_rope_theta for m in ("encoder", "decoder"))
        assert local == ETTIN_LOCAL_ROPE.get((size, phase.name), (160_000.0, 160_000.0))
        assert (phase.schedule.warmup_tokens, phase.schedule.decay, phase.schedule.decay_tokens,
                phase.schedule.start, phase.schedule.floor) == (0, "1-sqrt", None, start, floor)
        assert (phase.train.batch_warmup_tokens, phase.optimizer, phase.optimizer_state) == \
            (0, recipe.optimizer, "keep")
        assert phase.train.microbatch_size % 64 == 0 and phase.train.max_microbatch_size is None


@pytest.mark.parametrize("size", ETTIN_PHASE_1)
@pytest.mark.parametrize("direction", ["enc2dec", "dec2enc"])
def test_cross_objective_recipes_hold_the_papers_schedule(size, direction):
    recipe = load_recipe(RECIPES / f"ettin-{size}-{direction}.yaml")
    paired = load_recipe(RECIPES / f"ettin-{size}.yaml")
    source, objective, mask = (("encoder", "clm", None) if direction == "enc2dec"
                               else ("decoder", "mlm", 0.15))
    assert recipe.train.objectives == (objective,) and recipe.phases == ()
    assert recipe.checkpoint.init_from == f"runs/ettin-{size}/{source}"  # weights only
    # The final architecture; RoPE 160k on every layer (Ettin's cross-train configs).
    final = paired.phases[-1].model
    assert recipe.model == dataclasses.replace(final, local_rope_theta=160_000.0)
    # A fresh optimizer whose peak is the cross-train learning rate: decay normalised by it.
    assert recipe.optimizer == dataclasses.replace(paired.optimizer,
                                                   learning_rate=ETTIN_CROSS_LR[size])
    big = size == "1b"
    assert (recipe.train.tokens, recipe.train.seq_len, recipe.train.global_batch_tokens) == \
        (16_666_666_667 if big else 50_000_000_000, 7999, 2_500_000)
    assert (recipe.train.seed, recipe.train.data_seed, recipe.train.batch_warmup_tokens) == \
        (210, 21, 10_000_000_000)
    schedule = recipe.schedule
    # From the peak after a 3B (1b: 1B) warmup; linear over the last 10B (1b: 3.333B) to 0.02x.
    assert (schedule.start, schedule.warmup_tokens, schedule.decay, schedule.decay_tokens,
            schedule.floor) == (1.0, 1_000_000_000 if big else 3_000_000_000, "linear",
                                3_333_000_000 if big else 10_000_000_000, 0.02)
    assert recipe.data.sources == paired.phases[-1].data.sources
    assert (recipe.data.chunking, recipe.data.mlm_masking) == ("ettin", "bernoulli")
    assert (recipe.model.dtype, recipe.model.precision) == ("bfloat16", "autocast")
    if mask is not None:
        assert recipe.data.mlm_mask_ratio == mask
    # Batch warmup by 1 row of 7999 tokens per chip; after it the ~320-row batch at once where
    # 5 rows per chip fit (docs/benchmarks.md, phase 2 at 5 rows per chip).
    assert (recipe.train.microbatch_size, recipe.train.max_microbatch_size) == (
        64, None if size in ("400m", "1b") else 320)


def test_a_phase_changes_one_members_model_only_there(tmp_path):
    path = _write(tmp_path, "r.yaml", """
        model: {preset: tiny}
        phases:
          - name: a
          - name: b
            model: {global_rope_theta: 160000.0, local_rope_theta: 160000.0}
            decoder:
              model: {local_rope_theta: 10000.0}
          - name: c
        """)
    recipe = load_recipe(path)
    decoder, encoder = recipe.for_member("decoder"), recipe.for_member("encoder")
    assert [p.model.local_rope_theta for p in decoder.phases] == [10000.0, 10000.0, 160000.0]
    assert [p.model.local_rope_theta for p in encoder.phases] == [10000.0, 160000.0, 160000.0]
    assert decoder.phases[1].model.global_rope_theta == 160000.0  # on top of the phase's model
    assert all(p.encoder is None and p.decoder is None for p in decoder.phases)
    # The resolved recipe (RUN_DIR/recipe.yaml) reads back equal; overrides reach the block.
    saved = _write(tmp_path, "saved.yaml", recipe_to_yaml(recipe))
    assert load_recipe(saved) == recipe
    changed = load_recipe(path, ["phases.1.decoder.model.local_rope_theta=5000.0"])
    assert changed.for_member("decoder").phases[1].model.local_rope_theta == 5000.0
    # Both members stay one architecture.
    bad = _write(tmp_path, "bad.yaml", """
        model: {preset: tiny}
        phases:
          - name: a
            decoder:
              model: {num_layers: 3}
        """)
    assert "decoder.model changes the architecture: num_layers" in _error(bad)
    typo = _write(tmp_path, "typo.yaml", """
        phases:
          - name: a
            decoder: {modle: {}}
        """)
    assert "phases.0.decoder.modle" in _error(typo)
