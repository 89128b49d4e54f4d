"""The shared Ettin network: configuration, presets, layers, attention and the model."""

from ettin_jax.models.config import OBJECTIVES, ModelConfig, Objective
from ettin_jax.models.presets import PRESETS, get_preset
from ettin_jax.models.transformer import (
    EttinModel,
    model_from_params,
    named_params,
    with_objective,
)

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "EttinModel",
    "ModelConfig",
    "Objective",
    "get_preset",
    "model_from_params",
    "named_params",
    "with_objective",
]
