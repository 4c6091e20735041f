"""Typed configuration: the Hydra schema (schema.py), recipe lookup and composition (compose.py) and validation
(validate.py). `validate(cfg)` raises one error that lists every problem with the key and the fix."""

from llmprune.config.compose import conf_dir, list_recipes, load_config, recipes_dir
from llmprune.config.schema import (
    DEFAULT_RECIPE,
    DataConfig,
    DepthConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    LLMPruneConfig,
    MegatronConfig,
    ModelConfig,
    PruneConfig,
    TargetsConfig,
    describe_schema,
)
from llmprune.config.validate import validate
from llmprune.errors import ConfigError

__all__ = ["DEFAULT_RECIPE", "ConfigError", "DataConfig", "DepthConfig", "DistillConfig", "EvalConfig", "ExportConfig",
           "LLMPruneConfig", "MegatronConfig", "ModelConfig", "PruneConfig", "TargetsConfig", "conf_dir",
           "describe_schema", "list_recipes", "load_config", "recipes_dir", "validate"]
