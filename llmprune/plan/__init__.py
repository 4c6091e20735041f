"""Targets, the pruning plan and the cost model: what to keep, and what it costs."""

from llmprune.plan.plan import (
    DEPTH_METHODS,
    TARGET_KEYS,
    PlanError,
    PruningPlan,
    choose_heads,
    choose_layers,
    depth_score_name,
    make_plan,
    resolve_targets,
)

__all__ = ["DEPTH_METHODS", "TARGET_KEYS", "PlanError", "PruningPlan", "choose_heads", "choose_layers",
           "depth_score_name", "make_plan", "resolve_targets"]
