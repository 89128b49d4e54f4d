"""Shared test set-up: CPU JAX, small random models, and helpers."""

from __future__ import annotations

import os
from pathlib import Path

from ettin_jax.compilation_cache import cache_environment, default_cache_directory

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the tests and every subprocess they start (they inherit
# the environment; JAX reads it at import, `ettin-jax train/eval` take JAX's directory), kept
# per machine next to the CLI's and shared by every checkout: the same programs compile once,
# not once per process and run. Entries are keyed by the program, the JAX version and the
# compiler flags, so a stale entry is never used.
for _name, _value in cache_environment(default_cache_directory().with_name("jax-tests")).items():
    os.environ.setdefault(_name, _value)
# Eight fake CPU devices for mesh tests; unsharded code runs on the first one as before. The
# tests' programs are tiny and compiling them is most of their time: LLVM optimisation is off
# (about 30% less wall time for compile-heavy tests; the same floating-point semantics).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()

import dataclasses  # noqa: E402
import zlib  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from ettin_jax.models import EttinModel, ModelConfig, get_preset, named_params  # noqa: E402


def small_config(**overrides) -> ModelConfig:
    """The tiny preset with overrides: 128 wide, head_dim 64, vocab 1024."""
    return dataclasses.replace(get_preset("tiny"), **overrides)


def flat_params(model: EttinModel) -> dict[tuple, np.ndarray]:
    """{path tuple: numpy array} of every parameter."""
    return {path: np.asarray(value) for path, value in named_params(model).items()}


def randomized_model(config: ModelConfig, objective: str, seed: int) -> EttinModel:
    """A model whose norm scales and decoder bias are random too (init leaves them 1 and 0),
    so that a parity test would notice a misplaced norm or bias."""
    model = EttinModel(config, objective, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale" or path[0] == "decoder_bias":
            value = np.asarray(var.get_value())
            var.set_value(jnp.asarray(value + rng.normal(0.0, 0.2, value.shape), value.dtype))
    nnx.update(model, state)
    return model


# Architectures for checks against transformers: (L - 1) % 3 != 0 for 2 and 6 layers, odd
# lengths, local windows smaller than the sequence, an explicit global-layer list.
HF_CASES = [
    dict(num_layers=2, seq=23, local_attention=8, global_layers=None),
    dict(num_layers=4, seq=37, local_attention=16, global_layers=None),
    dict(num_layers=6, seq=41, local_attention=12, global_layers=(1, 4)),
]


def case_id(case: dict) -> str:
    return f"L{case['num_layers']}-S{case['seq']}"


def case_config(case: dict, rng: np.random.Generator) -> ModelConfig:
    """small_config with the case's layers and window and random, distinct RoPE thetas.

    init_std 0.2, not Ettin's 0.02: at 0.02 the attention scores are so flat that a wrong RoPE
    base or window moves the logits by less than the parity tolerance."""
    return small_config(
        init_std=0.2,
        num_layers=case["num_layers"],
        local_attention=case["local_attention"],
        global_layers=case["global_layers"],
        global_rope_theta=float(rng.choice([160_000.0, 80_000.0])),
        local_rope_theta=float(rng.choice([10_000.0, 5_000.0])),
    )


def transformers_config_fields(config: ModelConfig) -> dict:
    """The fields of a transformers ModernBERT(-decoder) config for `config`'s architecture,
    written by hand (not by ettin_jax's export), for references built in transformers."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, local_attention=config.local_attention,
        layer_types=["full_attention" if t == "global" else "sliding_attention"
                     for t in config.layer_types],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )


def padded_batch(seq: int, vocab_size: int, rng: np.random.Generator):
    """Random ids [3, seq] and an attention mask with right padding in rows 1 and 2 (int64)."""
    ids = rng.integers(0, vocab_size, (3, seq))
    attention_mask = np.ones((3, seq), np.int64)
    attention_mask[1, seq - 9:] = 0
    attention_mask[2, seq - 1:] = 0
    return ids, attention_mask


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 512-piece SentencePiece tokenizer trained on four bundled documents."""
    from data_pipelines.corpus import bundled_documents
    from data_pipelines.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, vocab_size=512, texts=[d.text for d in bundled_documents()[:4]])
    return out


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """A TFDS data_dir holding a real prepared glue/<task> for the eight presets (tiny GLUE
    files, `glue_copy.prepare_glue_copy`), and what each split holds."""
    from glue_copy import prepare_glue_copy

    return prepare_glue_copy(tmp_path_factory.mktemp("glue"))


# The TPU ahead-of-time compilations run in one subprocess (tests/tpu_aot_jobs.py: libtpu loads
# once and stays out of the test process), started as soon as the tests are collected so that it
# compiles on the second core while the first runs other tests.
_TPU_AOT: dict = {}


def pytest_collection_modifyitems(session, config, items) -> None:
    if any("tpu_aot" in item.fixturenames for item in items) and not _TPU_AOT:
        import subprocess
        import sys
        import tempfile

        _TPU_AOT["dir"] = tempfile.TemporaryDirectory(prefix="tpu_aot-")
        _TPU_AOT["out"] = Path(_TPU_AOT["dir"].name) / "results.json"
        _TPU_AOT["process"] = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("tpu_aot_jobs.py")),
             str(_TPU_AOT["out"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def pytest_unconfigure(config) -> None:
    if _TPU_AOT:
        _TPU_AOT["process"].kill()
        _TPU_AOT["process"].wait()
        _TPU_AOT["dir"].cleanup()


@pytest.fixture(scope="session")
def tpu_aot() -> dict:
    """Every TPU ahead-of-time compilation the tests check: {job: {"result" or "error",
    "stderr"}} from the subprocess started at collection."""
    import json

    _, err = _TPU_AOT["process"].communicate(timeout=900)
    assert _TPU_AOT["process"].returncode == 0, err[-3000:]
    return json.loads(_TPU_AOT["out"].read_text())


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy generator seeded differently for every test (fresh seeds, reproducible by name)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@nnx.jit(static_argnames=("deterministic",))
def run_hidden(model, input_ids, segment_ids=None, positions=None, *, deterministic=True,
               dropout_rng=None):
    """model(...) under jit: one XLA compile is far cheaper on CPU than eager op-by-op dispatch."""
    return model(input_ids, segment_ids, positions, deterministic=deterministic,
                 dropout_rng=dropout_rng)


@nnx.jit
def run_logits(model, input_ids, segment_ids=None, positions=None):
    """model.logits(model(...)) under jit, evaluation mode."""
    return model.logits(model(input_ids, segment_ids, positions))


class ByteTokenizer:
    """A tiny, exact tokenizer for data tests: UTF-8 bytes shifted past the five special ids of
    ettin-jax's layout ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4)."""

    vocab_size = 256 + 5

    def __init__(self):
        from data_pipelines.special_tokens import PROJECT

        self.special_tokens = PROJECT

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 5

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) - 5 for i in ids if int(i) >= 5).decode("utf-8", errors="replace")

    def save(self, directory):
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "byte_tokenizer.txt").write_text("bytes + 5\n")
        return ("byte_tokenizer.txt",)
