"""The shared Ettin network: configuration, presets, layers, attention and the model."""

from ettin_jax.models.classification import (
    EttinClassifier,
    HeadConfig,
    classifier_from_backbone,
    classifier_from_params,
    classifier_params,
)
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
    "EttinClassifier",
    "EttinModel",
    "HeadConfig",
    "ModelConfig",
    "Objective",
    "classifier_from_backbone",
    "classifier_from_params",
    "classifier_params",
    "get_preset",
    "model_from_params",
    "named_params",
    "with_objective",
]
