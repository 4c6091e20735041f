"""Importance methods: Minitron activations, depth by removal and Block Importance, and the baselines.

`unit_scores` is the one place that picks the method for the width units (prune.importance).
"""

from __future__ import annotations

import torch

from llmprune.importance.activation import activation_scores
from llmprune.importance.baselines import baseline_scores

METHODS = ("activation", "magnitude", "taylor", "random")


def unit_scores(method: str, model, adapter, batches, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores of every prunable unit by `method`: activation (Minitron) or a baseline (magnitude, taylor, random)."""
    if method == "activation":
        return activation_scores(model, adapter, batches, total=len(batches))
    if method in METHODS:
        return baseline_scores(method, model, adapter, batches, seed=seed)
    raise ValueError(f"unknown importance method {method!r}; known: {', '.join(METHODS)}")
