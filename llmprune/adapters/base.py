"""What every adapter shares: the hook site record and score post-processing that only needs sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from llmprune.adapters.heads import CausalLMHead
from llmprune.plan.cost import CostModel, parameter_shapes
from llmprune.pruning.apply import apply_plan
from llmprune.pruning.map import PruningMap


@dataclass
class Site:
    """An activation Minitron scores: the `input` or `output` of `module`, whose last dim is the scored channel.

    `channels=(start, stop)` scores only that slice of the last dim (e.g. the x part of a Mamba in_proj's fused
    z / x / B / C / dt output).
    """

    name: str
    module: nn.Module
    capture: Literal["input", "output"]
    channels: tuple[int, int] | None = None


class Adapter(Protocol):
    """What the pipeline needs from a model family. Only adapters know module names.

    Attributes:
        family: name recorded in plans.
        model_types: the `config.model_type` values this adapter handles.
        backbone: the model without its LM head (calibration runs it).
        layers: the decoder blocks, in order (depth scoring and Block Importance hook them).
        layer_types: (hybrids only, optional) each layer's type, e.g. NemotronH's layers_block_type; make_plan
            records the removed layers' types from it.
        head: the part on top of the layers (final norm, LM head, next-token loss); see heads.py.
        config: the Hugging Face config the model is (or exports as); rewrite_config edits a copy of it.
    """

    family: str
    model_types: tuple[str, ...]
    backbone: nn.Module
    layers: nn.ModuleList
    config: object

    def dims(self) -> dict[str, int]:
        """Current sizes by ModelOpt name (hidden_size, ffn_hidden_size, ..., num_layers): only the dimensions this
        family can prune (a Mamba2 model has no ffn_hidden_size), plus fixed sizes such as vocab_size."""

    head: CausalLMHead

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head applied to the last block's output."""

    def importance_sites(self) -> list[Site]:
        """The activations Minitron scores."""

    def derive_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn per-site channel scores into the unit scores the plan ranks (heads, hidden, ...)."""

    def prunable_weights(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """Per score name, the modules whose rows ('out', or ('out', start, stop) for part of a fused weight) or
        columns ('in', 'emb') it owns (weight baselines)."""

    def pruning_map(self) -> PruningMap:
        """Which kept-index list slices which axis of every parameter (see pruning/map.py)."""

    def cost_model(self) -> CostModel:
        """Parameters, FLOPs and memory at any target, from the pruning map (see plan/cost.py)."""

    def count_params(self, shape: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> int:
        """Exact parameter count of this model at `shape`; hybrids need `kept_layers` when num_layers shrinks."""

    def check_plan(self, plan) -> None:
        """Family-specific checks (or warnings) before a plan is applied."""

    def apply(self, plan) -> nn.Module:
        """The model pruned to `plan` (a new module); the adapter then describes the new model."""

    @staticmethod
    def rewrite_config(c, target: dict[str, int], kept_layers: list[int], eps_scale: float = 1.0) -> None:
        """Set config `c` to the shape `target` with the layers `kept_layers` (also used for early export checks)."""

    @staticmethod
    def stock_alternative(config):
        """(config, model class) of an equivalent stock architecture for a pruned `config` whose own class rejects
        the shape, or None."""


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


class HFAdapter:
    """What every Hugging Face adapter shares: pruning through the family's map (rebuilt from the rewritten config)
    and costs from the same map. Subclasses declare `pruning_map`, `dims`, `rewrite_config` and the hook sites."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def check_plan(self, plan) -> None:
        """Family-specific checks before pruning (none by default)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)

    def apply(self, plan) -> nn.Module:
        self.check_plan(plan)
        self.model = apply_plan(self.model, self, plan)
        self.config = self.model.config
        return self.model

    def cost_model(self) -> CostModel:
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        return CostModel(self.pruning_map(), parameter_shapes(self.model), self.dims(),
                         tied=head is not None and head.weight is embed.weight,
                         layer_types=getattr(self, "layer_types", None), extra=self.cost_constants())

    def cost_constants(self) -> dict:
        """Sizes the cost formulas need that pruning never changes (Mamba: state size, conv kernel, chunk)."""
        c = self.config
        state = getattr(c, "ssm_state_size", None) or getattr(c, "state_size", None)
        if state is None:
            return {}
        return {"ssm_state_size": state, "conv_kernel": c.conv_kernel, "chunk_size": c.chunk_size}

    def count_params(self, shape: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> int:
        return self.cost_model().params(shape, kept_layers)
