"""What every adapter shares: the hook site record and score post-processing that only needs sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class Site:
    """An activation Minitron scores: the `input` or `output` of `module`, whose last dim is the scored channel."""

    name: str
    module: nn.Module
    capture: Literal["input", "output"]


def derive_attention_and_hidden_scores(raw: dict[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Add `heads.{i}` and `hidden` to the raw per-site channel scores.

    A head's score is the L2 norm of its head_dim channel scores at the input of the output projection;
    the hidden score is the sum over layers and norms of the norm-output channel scores (DESIGN.md).
    """
    scores = dict(raw)
    hidden = None
    for name, value in raw.items():
        if name.startswith("attn."):
            i = name.split(".")[1]
            scores[f"heads.{i}"] = value.view(dims["num_attention_heads"], dims["head_dim"]).norm(dim=1)
        elif name.startswith("hidden."):
            hidden = value.clone() if hidden is None else hidden + value
    if hidden is not None:
        scores["hidden"] = hidden
    return scores
