"""Adapter for Mamba2ForCausalLM (state-space model, every layer a Mamba-2 mixer).

The only file that knows this model's module names. Layout (transformers):
  backbone.embeddings -> backbone.layers[i].{norm, mixer.{in_proj, conv1d, A_log, D, dt_bias, norm, out_proj}}
  -> backbone.norm_f -> lm_head (tied or not). The mixer's layout is described in mamba_mixer.py.
Mamba2Config ties the mixer width to the hidden size: hidden_size * expand == num_heads * head_dim, expand an int,
so targets must keep mamba_num_heads * mamba_head_dim a multiple of hidden_size (see check_expand). No stock class
takes the other shapes: NemotronHForCausalLM computes the same function with every layer a Mamba layer, but stock
generate() fails on a NemotronH cache without attention layers (transformers 5.x), so it is no fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.adapters.base import HFAdapter, Site, derive_attention_and_hidden_scores
from llmprune.adapters.heads import CausalLMHead
from llmprune.adapters.mamba_mixer import (
    derive_mamba_scores,
    mixer_rules,
    prunable_weights,
    x_channels,
)
from llmprune.plan import PlanError
from llmprune.pruning.map import PruningMap, Rule


def check_expand(config, target: dict[str, int]) -> int:
    """The integer `expand` Mamba2Config needs at `target` (hidden_size * expand == heads * head_dim).

    Raises:
        PlanError: the Mamba width is not a whole multiple of the hidden size; the message suggests targets that are.
    """
    hidden, heads, head_dim = target["hidden_size"], target["mamba_num_heads"], target["mamba_head_dim"]
    if heads * head_dim % hidden == 0:
        return heads * head_dim // hidden
    expand, groups = config.expand, config.n_groups
    hints = []
    if expand * hidden % head_dim == 0 and expand * hidden // head_dim % groups == 0:
        hints.append(f"mamba_num_heads={expand * hidden // head_dim}")
    if heads * head_dim % expand == 0:
        hints.append(f"hidden_size={heads * head_dim // expand}")
    hint = f" For expand={expand} choose {' or '.join(hints)}." if hints else ""
    raise PlanError(
        "Invalid pruning targets for Mamba2: Mamba2Config needs hidden_size * expand == mamba_num_heads * "
        f"mamba_head_dim with a whole expand, but hidden_size={hidden} and mamba_num_heads * mamba_head_dim = "
        f"{heads} * {head_dim} = {heads * head_dim}, not a multiple of {hidden}.{hint}")


PRUNING_MAP = PruningMap(
    rules=(
        Rule("backbone.embeddings.weight", (None, "hidden"), scale="residual"),
        Rule("backbone.norm_f.weight", ("hidden",), scale="final"),
        Rule("lm_head.weight", (None, "hidden"), scale="residual", matmul=True),
        Rule("backbone.layers.{i}.norm.weight", ("hidden",), scale="hidden"),
        *mixer_rules("backbone.layers.{i}.mixer."),
    ),
    layers="backbone.layers.{i}.",
    tied=("lm_head.weight", "backbone.embeddings.weight"),
)


class Mamba2Adapter(HFAdapter):
    """Minitron pruning for Mamba-2 models: hidden size, Mamba heads, Mamba head dim and depth."""

    family = "mamba2"
    model_types = ("mamba2",)

    @staticmethod
    def pruning_map() -> PruningMap:
        return PRUNING_MAP

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def dims(self) -> dict[str, int]:
        """Current sizes, by ModelOpt name; mamba_num_groups (n_groups) and vocab_size are not prunable."""
        c = self.config
        return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "mamba_num_heads": c.num_heads,
                "mamba_head_dim": c.head_dim, "mamba_num_groups": c.n_groups, "vocab_size": c.vocab_size}

    @property
    def head(self) -> CausalLMHead:
        return CausalLMHead(self.model.backbone.norm_f, self.model.lm_head)

    def importance_sites(self) -> list[Site]:
        """The x part of every in_proj output (Mamba heads and head dim) and every block norm's output (hidden)."""
        sites = []
        for i, layer in enumerate(self.layers):
            sites.append(Site(f"mamba.{i}", layer.mixer.in_proj, "output", x_channels(layer.mixer)))
            sites.append(Site(f"hidden.{i}.norm", layer.norm, "output"))
        return sites

    def derive_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = derive_attention_and_hidden_scores(raw, self.dims())
        d = self.dims()
        scores.update(derive_mamba_scores(raw, {i: (d["mamba_num_heads"], d["mamba_head_dim"])
                                                for i in range(d["num_layers"])}))
        return scores

    def prunable_weights(self) -> dict[str, list]:
        out: dict[str, list] = {"hidden": [(self.backbone.embeddings, "emb")]}
        for i, layer in enumerate(self.layers):
            out[f"mamba.{i}"], hidden = prunable_weights(layer.mixer)
            out["hidden"] += hidden
        if self.model.lm_head.weight is not self.backbone.embeddings.weight:
            out["hidden"].append((self.model.lm_head, "in"))
        return out

    # -- parameter count ---------------------------------------------------------------------------------------

    # -- pruning -----------------------------------------------------------------------------------------------
    @staticmethod
    def rewrite_config(c, target: dict[str, int], kept_layers: list[int], eps_scale: float = 1.0) -> None:
        """Set config `c` to the pruned shape (expand included). Raises PlanError for shapes Mamba2Config rejects."""
        c.expand = check_expand(c, target)
        c.hidden_size = target["hidden_size"]
        c.num_heads = target["mamba_num_heads"]
        c.head_dim = target["mamba_head_dim"]
        c.num_hidden_layers = target["num_layers"]
        c.layer_norm_epsilon = c.layer_norm_epsilon * eps_scale

    # -- export ------------------------------------------------------------------------------------------------
    @staticmethod
    def stock_alternative(config):
        """None: the shapes Mamba2Config rejects are refused before pruning (check_expand)."""
        return None
