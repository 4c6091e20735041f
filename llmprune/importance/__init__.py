"""Importance methods: Minitron activations, depth by removal and Block Importance, and the baselines.

`unit_scores` is the one place that picks the method for the width units: prune.mode names the pruning method
(minitron: activation importance over forward passes; gradnas: gradient scores of a loss, importance/gradnas.py),
prune.importance the scorer within it (the Minitron activations, or a baseline for ablations).
"""

from __future__ import annotations

import torch

from llmprune.errors import ConfigError
from llmprune.importance.activation import activation_scores
from llmprune.importance.baselines import baseline_scores

# mode -> its importance scorers; gradnas scores by gradients of a loss (importance/gradnas.py: gradnas_scores)
MODES = {"minitron": ("activation", "magnitude", "taylor", "random"), "gradnas": ("gradient",)}


def unit_scores(mode: str, method: str, model, adapter, batches, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores of every prunable unit for pruning `mode` by `method` (minitron: activation, or a baseline)."""
    if method not in MODES.get(mode, ()):
        raise ConfigError(f"prune.mode={mode} has no importance '{method}'; known: {MODES}")
    if method == "activation":
        return activation_scores(model, adapter, batches, total=len(batches))
    return baseline_scores(method, model, adapter, batches, seed=seed)
