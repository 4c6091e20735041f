"""Adapter for NemotronHForCausalLM: the Nemotron-H hybrid of Mamba-2, attention and MLP layers.

The only file that knows this model's module names. Layout (transformers):
  model.embeddings -> model.layers[i].{norm, mixer} -> model.norm_f -> lm_head, where layer i's mixer is chosen by
  config.layers_block_type[i]:
    linear_attention  Mamba-2 mixer {in_proj, conv1d, A_log, D, dt_bias, norm, out_proj} (see mamba_mixer.py)
    full_attention    {q,k,v,o}_proj, GQA, no bias and no rotary embedding; query head h uses KV head
                      h // (heads / kv_heads)
    mlp               {up,down}_proj (squared ReLU)
MoE layers ('moe') are not supported. Depth pruning keeps config.layers_block_type equal to the kept layers' types.
"""

from __future__ import annotations

import logging

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
from llmprune.errors import ConfigError
from llmprune.pruning.map import PruningMap, Rule

MAMBA, ATTENTION, MLP = "linear_attention", "full_attention", "mlp"  # transformers' layers_block_type names
log = logging.getLogger("llmprune")


_MIXER = "model.layers.{i}.mixer."
PRUNING_MAP = PruningMap(  # every layer has one mixer; its type decides which of these names it holds
    rules=(
        Rule("model.embeddings.weight", (None, "hidden"), scale="residual"),
        Rule("model.norm_f.weight", ("hidden",), scale="final"),
        Rule("lm_head.weight", (None, "hidden"), scale="residual", matmul=True),
        Rule("model.layers.{i}.norm.weight", ("hidden",), scale="hidden"),
        *mixer_rules(_MIXER),
        Rule(_MIXER + "q_proj.weight", ("q", "hidden"), matmul=True),
        Rule(_MIXER + "k_proj.weight", ("kv", "hidden"), matmul=True),
        Rule(_MIXER + "v_proj.weight", ("kv", "hidden"), matmul=True),
        Rule(_MIXER + "o_proj.weight", ("hidden", "q"), scale="residual", matmul=True, kind="attention"),
        Rule(_MIXER + "q_proj.bias", ("q",)),
        Rule(_MIXER + "k_proj.bias", ("kv",)),
        Rule(_MIXER + "v_proj.bias", ("kv",)),
        Rule(_MIXER + "o_proj.bias", ("hidden",), scale="residual"),
        Rule(_MIXER + "up_proj.weight", ("ffn", "hidden"), matmul=True),
        Rule(_MIXER + "down_proj.weight", ("hidden", "ffn"), scale="residual", matmul=True),
        Rule(_MIXER + "up_proj.bias", ("ffn",)),
        Rule(_MIXER + "down_proj.bias", ("hidden",), scale="residual"),
    ),
    layers="model.layers.{i}.",
    tied=("lm_head.weight", "model.embeddings.weight"),
)


class NemotronHAdapter(HFAdapter):
    """Minitron pruning for Nemotron-H: hidden size, FFN, attention heads and groups, Mamba heads and head dim,
    and depth."""

    family = "nemotron_h"
    model_types = ("nemotron_h",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        unsupported = [(i, t) for i, t in enumerate(self.layer_types) if t not in (MAMBA, ATTENTION, MLP)]
        if unsupported:
            raise ConfigError(
                f"This Nemotron-H model has layers llmprune cannot prune yet: {unsupported} (index, layers_block_type)."
                f" Supported layer types: {MAMBA} (Mamba-2), {ATTENTION}, {MLP}; MoE checkpoints such as "
                "Nemotron-3-Nano-30B-A3B are not supported. Use a dense Nemotron-H (e.g. NVIDIA-Nemotron-Nano-12B-v2).")

    @staticmethod
    def pruning_map() -> PruningMap:
        return PRUNING_MAP

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def layer_types(self) -> list[str]:
        """Each layer's type (config.layers_block_type)."""
        return list(self.config.layers_block_type)

    def dims(self) -> dict[str, int]:
        """Current sizes, by ModelOpt name; head_dim, mamba_num_groups and vocab_size are not prunable."""
        c = self.config
        return {"hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
                "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_key_value_heads,
                "num_layers": len(c.layers_block_type), "mamba_num_heads": c.mamba_num_heads,
                "mamba_head_dim": c.mamba_head_dim, "head_dim": c.head_dim, "mamba_num_groups": c.n_groups,
                "vocab_size": c.vocab_size}

    @property
    def head(self) -> CausalLMHead:
        return CausalLMHead(self.model.model.norm_f, self.model.lm_head)

    def importance_sites(self) -> list[Site]:
        """Per layer type: the x part of in_proj's output (Mamba), o_proj's input (attention), down_proj's input
        (MLP); every block norm's output (hidden)."""
        sites = []
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            mixer = layer.mixer
            if kind == MAMBA:
                sites.append(Site(f"mamba.{i}", mixer.in_proj, "output", x_channels(mixer)))
            elif kind == ATTENTION:
                sites.append(Site(f"attn.{i}", mixer.o_proj, "input"))
            else:
                sites.append(Site(f"ffn.{i}", mixer.down_proj, "input"))
            sites.append(Site(f"hidden.{i}.norm", layer.norm, "output"))
        return sites

    def derive_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = self.dims()
        scores = derive_attention_and_hidden_scores(raw, d)
        scores.update(derive_mamba_scores(raw, {i: (d["mamba_num_heads"], d["mamba_head_dim"])
                                                for i, kind in enumerate(self.layer_types) if kind == MAMBA}))
        return scores

    def prunable_weights(self) -> dict[str, list]:
        out: dict[str, list] = {"hidden": [(self.backbone.embeddings, "emb")]}
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            m = layer.mixer
            if kind == MAMBA:
                out[f"mamba.{i}"], hidden = prunable_weights(m)
            elif kind == ATTENTION:
                out[f"attn.{i}"] = [(m.q_proj, "out"), (m.o_proj, "in")]
                hidden = [(m.q_proj, "in"), (m.k_proj, "in"), (m.v_proj, "in"), (m.o_proj, "out")]
            else:
                out[f"ffn.{i}"] = [(m.up_proj, "out"), (m.down_proj, "in")]
                hidden = [(m.up_proj, "in"), (m.down_proj, "out")]
            out["hidden"] += hidden
        if self.model.lm_head.weight is not self.backbone.embeddings.weight:
            out["hidden"].append((self.model.lm_head, "in"))
        return out

    # -- pruning (a plan that removes every attention layer is refused by make_plan) ------------------------------
    @staticmethod
    def rewrite_config(c, target: dict[str, int], kept_layers: list[int], eps_scale: float = 1.0) -> None:
        """Set config `c` to the pruned shape; layers_block_type (num_hidden_layers follows it) keeps the kept
        layers' types in order."""
        c.hidden_size = target["hidden_size"]
        c.intermediate_size = target["ffn_hidden_size"]
        c.num_attention_heads = target["num_attention_heads"]
        c.num_key_value_heads = target["num_query_groups"]
        c.head_dim = target["head_dim"]
        c.mamba_num_heads = target["mamba_num_heads"]
        c.mamba_head_dim = target["mamba_head_dim"]
        c.layers_block_type = [c.layers_block_type[i] for i in kept_layers]
        c.layer_norm_epsilon = c.layer_norm_epsilon * eps_scale

    # -- export ------------------------------------------------------------------------------------------------
    @staticmethod
    def stock_alternative(config):
        """None: NemotronHConfig accepts every shape this adapter produces."""
        return None
