"""`describe`: parameter counts against the reference table, FLOPs against a brute-force count,
and the CLI's JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import small_config

from ettin_jax.models import get_preset
from ettin_jax.models.attention import local_window, visibility_mask
from ettin_jax.models.describe import (
    describe_pair,
    mean_visible_keys,
    parameter_shapes,
    training_flops_per_token,
)

# The Ettin model cards' sizes: total (tied) and non-embedding parameters.
REFERENCE = {
    "ettin-17m": (16.91e6, 3.90e6),
    "ettin-32m": (32.08e6, 12.54e6),
    "ettin-68m": (68.46e6, 42.36e6),
    "ettin-150m": (149.66e6, 110.33e6),
    "ettin-400m": (395.88e6, 343.2e6),
    "ettin-1b": (1031.3e6, 937.8e6),
}


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_parameter_counts_match_the_reference(preset):
    report = describe_pair(get_preset(preset), seq_len=1024, mlm_mask_ratio=0.3)
    total, non_embedding = REFERENCE[preset]
    for member in ("encoder", "decoder"):
        assert report[member]["params"] == pytest.approx(total, rel=5e-3)
        assert report[member]["non_embedding_params"] == pytest.approx(non_embedding, rel=5e-3)
    # Same network: the pair differs only in mask and objective, never in parameters.
    assert report["encoder"]["params"] == report["decoder"]["params"]


def test_parameter_count_follows_the_formula():
    config = small_config(num_layers=5)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    norms = h * (1 + 1 + 2 * config.num_layers - 1 + 1)  # embed, final, blocks (layer 0: 1), head
    expected = v * h + config.num_layers * (3 * h * h + h * h + 2 * h * i + i * h) + h * h + v + norms
    assert sum(int(np.prod(s)) for s in parameter_shapes(config, "mlm").values()) == expected


@pytest.mark.parametrize("seq_len", [1, 7, 64, 131])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_mean_visible_keys_matches_the_mask(seq_len, causal, local):
    window = local_window(32, causal=causal) if local else None
    mask = np.asarray(visibility_mask(np.ones((1, seq_len), np.int32), causal=causal, window=window))
    assert mean_visible_keys(seq_len, causal=causal, window=window) == pytest.approx(
        mask.reshape(-1, seq_len, seq_len)[0].sum(-1).mean())


def test_training_flops_formula():
    config = small_config()
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, 4
    seq = 16  # shorter than the local window: every layer sees the whole (causal) row
    encoder = training_flops_per_token(config, "mlm", seq_len=seq, mlm_mask_ratio=0.25)
    decoder = training_flops_per_token(config, "clm", seq_len=seq, mlm_mask_ratio=0.25)
    assert encoder["matmul"] == decoder["matmul"] == 3 * layers * 2 * (4 * h * h + 3 * h * i)
    assert encoder["attention"] == 3 * layers * 4 * h * seq
    assert decoder["attention"] == 3 * layers * 4 * h * (seq + 1) / 2
    assert encoder["head"] == 3 * 0.25 * 2 * (h * h + h * v)
    assert decoder["head"] == 3 * 2 * (h * h + h * v)
    assert encoder["total"] == encoder["matmul"] + encoder["attention"] + encoder["head"]


def test_cli_describe_json_gives_the_reference_counts():
    out = subprocess.run(
        [sys.executable, "-m", "ettin_jax", "describe", "ettin-150m", "--json"],
        capture_output=True, text=True, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    ).stdout
    report = json.loads(out)
    assert report["encoder"]["params"] == report["decoder"]["params"] == 149_655_232
    assert report["encoder"]["non_embedding_params"] == 110_331_648
    assert report["model"]["layer_types"][:4] == ["global", "local", "local", "global"]
    assert report["decoder"]["train_flops_per_token"] > report["encoder"]["train_flops_per_token"]
