"""Recipes: typed sections, YAML and gin loading, dotted overrides, validation."""

from ettin_jax.config.loading import (
    load_recipe,
    override_recipe,
    recipe_from_preset,
    recipe_to_dict,
    recipe_to_yaml,
)
from ettin_jax.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MemberChanges,
    MeshConfig,
    OptimizerConfig,
    PhaseConfig,
    Recipe,
    ScheduleConfig,
    SourceConfig,
    TrainConfig,
    member_of,
)
from ettin_jax.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MemberChanges",
    "MeshConfig",
    "OptimizerConfig",
    "PhaseConfig",
    "Recipe",
    "ScheduleConfig",
    "SourceConfig",
    "TrainConfig",
    "load_recipe",
    "member_of",
    "override_recipe",
    "recipe_from_preset",
    "recipe_to_dict",
    "recipe_to_yaml",
]
