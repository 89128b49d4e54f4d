"""The shared Ettin network: configuration, presets, layers, attention and the model."""

from ettin_jax.models.classification import (
    EttinClassifier,
    HeadConfig,
    classifier_from_backbone,
    classifier_from_params,
    classifier_params,
)
from ettin_jax.models.config import OBJECTIVES, ModelConfig, Objective
from ettin_jax.models.embedding import EmbeddingConfig, embed, without_lm_head
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
    "EmbeddingConfig",
    "EttinClassifier",
    "EttinModel",
    "HeadConfig",
    "ModelConfig",
    "Objective",
    "classifier_from_backbone",
    "classifier_from_params",
    "classifier_params",
    "embed",
    "get_preset",
    "model_from_params",
    "named_params",
    "with_objective",
    "without_lm_head",
]
