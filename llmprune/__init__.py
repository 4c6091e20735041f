"""llmprune: make large language models smaller and keep them good (Minitron pruning, HF export)."""

from llmprune.api import compute_scores, prune
from llmprune.config import ConfigError, list_recipes, load_config
from llmprune.plan import PlanError, PruningPlan

__all__ = ["prune", "compute_scores", "load_config", "list_recipes", "ConfigError", "PlanError", "PruningPlan",
           "run"]
__version__ = "0.1.0"


def run(recipe: str = "smollm2_minitron", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose `recipe` with overrides and run it end to end; returns the report."""
    from llmprune.pipeline import run as run_config

    return run_config(load_config(recipe, overrides))
