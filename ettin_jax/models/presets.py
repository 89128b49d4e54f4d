"""Named architectures: the six Ettin sizes and a `tiny` one for CPU tests.

Adding a preset is a data change: one entry in `PRESETS`.
"""

from __future__ import annotations

from ettin_jax.errors import did_you_mean
from ettin_jax.models.config import ModelConfig


def _ettin(name: str, layers: int, hidden: int, intermediate: int, heads: int) -> ModelConfig:
    return ModelConfig(
        preset=name,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=heads,
    )


PRESETS: dict[str, ModelConfig] = {
    "ettin-17m": _ettin("ettin-17m", 7, 256, 384, 4),
    "ettin-32m": _ettin("ettin-32m", 10, 384, 576, 6),
    "ettin-68m": _ettin("ettin-68m", 19, 512, 768, 8),
    "ettin-150m": _ettin("ettin-150m", 22, 768, 1152, 12),
    "ettin-400m": _ettin("ettin-400m", 28, 1024, 2624, 16),
    "ettin-1b": _ettin("ettin-1b", 28, 1792, 3840, 28),
    # CPU-sized: 4 layers (global, local, local, global), a local window smaller than the
    # test sequences, distinct RoPE thetas, head_dim 64 as in every Ettin size.
    "tiny": ModelConfig(
        preset="tiny",
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=192,
        num_layers=4,
        num_heads=2,
        local_attention=32,
        global_rope_theta=160_000.0,
        local_rope_theta=10_000.0,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Returns the `ModelConfig` of preset `name`.

    Raises ValueError naming the unknown preset, the closest names and all valid ones.
    """
    if name not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}.{did_you_mean(name, PRESETS)} "
            f"Valid presets: {', '.join(PRESETS)}"
        )
    return PRESETS[name]

