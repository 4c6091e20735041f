"""llmprune: make large language models smaller and keep them good (Minitron pruning, HF export).

`prune`, `compute_scores`, `PruningPlan` and `PlanError` load torch on first use, so `python -m llmprune --help`,
`--list-recipes` and `--cfg` answer without it (a second instead of five).
"""

from importlib import import_module

from llmprune.config import ConfigError, list_recipes, load_config

__all__ = ["prune", "compute_scores", "load_config", "list_recipes", "ConfigError", "PlanError", "PruningPlan",
           "run"]
__version__ = "0.1.0"
_LAZY = {"prune": "llmprune.api", "compute_scores": "llmprune.api", "PlanError": "llmprune.plan",
         "PruningPlan": "llmprune.plan"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(recipe: str = "smollm2_minitron", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose `recipe` with overrides and run it end to end; returns the report."""
    from llmprune.pipeline import run as run_config

    return run_config(load_config(recipe, overrides))
