"""Adapter for llama-like decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

The only file that knows these models' module names. Layout (transformers):
  model.embed_tokens -> layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj (+ q_norm, k_norm on qwen3),
  post_attention_layernorm, mlp.{gate,up,down}_proj} -> model.norm -> lm_head (tied or not).
q_proj rows are head-major ((heads, head_dim)); query head h uses KV head h // (heads / kv_heads).
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.adapters.base import HFAdapter, Site, derive_attention_and_hidden_scores
from llmprune.adapters.heads import CausalLMHead
from llmprune.pruning.map import PruningMap, Rule


def _layer_rules(prefix: str) -> tuple[Rule, ...]:
    """Attention, MLP and both norms of one decoder layer (`prefix` ends in "{i}.")."""
    p = prefix
    return (
        Rule(p + "input_layernorm.weight", ("hidden",), scale="hidden"),
        Rule(p + "post_attention_layernorm.weight", ("hidden",), scale="hidden"),
        Rule(p + "self_attn.q_proj.weight", ("q", "hidden"), matmul=True),
        Rule(p + "self_attn.k_proj.weight", ("kv", "hidden"), matmul=True),
        Rule(p + "self_attn.v_proj.weight", ("kv", "hidden"), matmul=True),
        Rule(p + "self_attn.o_proj.weight", ("hidden", "q"), scale="residual", matmul=True, kind="attention"),
        Rule(p + "self_attn.q_proj.bias", ("q",)),
        Rule(p + "self_attn.k_proj.bias", ("kv",)),
        Rule(p + "self_attn.v_proj.bias", ("kv",)),
        Rule(p + "self_attn.o_proj.bias", ("hidden",), scale="residual"),
        Rule(p + "self_attn.q_norm.weight", (None,)),  # qwen3: per head_dim, never pruned
        Rule(p + "self_attn.k_norm.weight", (None,)),
        Rule(p + "mlp.gate_proj.weight", ("ffn", "hidden"), matmul=True),
        Rule(p + "mlp.up_proj.weight", ("ffn", "hidden"), matmul=True),
        Rule(p + "mlp.down_proj.weight", ("hidden", "ffn"), scale="residual", matmul=True),
        Rule(p + "mlp.gate_proj.bias", ("ffn",)),
        Rule(p + "mlp.up_proj.bias", ("ffn",)),
        Rule(p + "mlp.down_proj.bias", ("hidden",), scale="residual"),
    )


PRUNING_MAP = PruningMap(
    rules=(
        Rule("model.embed_tokens.weight", (None, "hidden"), scale="residual"),
        Rule("model.norm.weight", ("hidden",), scale="final"),
        Rule("lm_head.weight", (None, "hidden"), scale="residual", matmul=True),
        *_layer_rules("model.layers.{i}."),
    ),
    layers="model.layers.{i}.",
    tied=("lm_head.weight", "model.embed_tokens.weight"),
)


class LlamaAdapter(HFAdapter):
    """Minitron pruning for llama-like decoders."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    hidden_norms = ("input_layernorm", "post_attention_layernorm")

    @staticmethod
    def pruning_map() -> PruningMap:
        return PRUNING_MAP

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The decoder without the LM head: calibration needs no logits."""
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def dims(self) -> dict[str, int]:
        """Current sizes, by ModelOpt name."""
        c = self.config
        return {
            "hidden_size": c.hidden_size,
            "ffn_hidden_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_key_value_heads,
            "num_layers": c.num_hidden_layers,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size,
        }

    @property
    def head(self) -> CausalLMHead:
        return CausalLMHead(self.model.model.norm, self.model.lm_head)

    def importance_sites(self) -> list[Site]:
        """Where Minitron reads activations (DESIGN.md: inputs of down_proj / o_proj, the norms' outputs)."""
        sites = []
        for i, layer in enumerate(self.layers):
            sites.append(Site(f"ffn.{i}", layer.mlp.down_proj, "input"))
            sites.append(Site(f"attn.{i}", layer.self_attn.o_proj, "input"))
            for norm in self.hidden_norms:
                sites.append(Site(f"hidden.{i}.{norm}", getattr(layer, norm), "output"))
        return sites

    def derive_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return derive_attention_and_hidden_scores(raw, self.dims())

    def prunable_weights(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """For weight-based baselines: per dimension, (linear, 'out'|'in') pairs whose rows / columns it owns."""
        out: dict[str, list] = {"hidden": [(self.model.model.embed_tokens, "emb")]}
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            out[f"ffn.{i}"] = [(mlp.gate_proj, "out"), (mlp.up_proj, "out"), (mlp.down_proj, "in")]
            out[f"attn.{i}"] = [(attn.q_proj, "out"), (attn.o_proj, "in")]
            out["hidden"] += [(attn.q_proj, "in"), (attn.k_proj, "in"), (attn.v_proj, "in"), (attn.o_proj, "out"),
                              (mlp.gate_proj, "in"), (mlp.up_proj, "in"), (mlp.down_proj, "out")]
        if self.model.lm_head.weight is not self.model.model.embed_tokens.weight:
            out["hidden"].append((self.model.lm_head, "in"))
        return out

    # -- parameter count ---------------------------------------------------------------------------------------

    # -- pruning -----------------------------------------------------------------------------------------------
    @staticmethod
    def rewrite_config(c, target: dict[str, int], kept_layers: list[int], eps_scale: float = 1.0) -> None:
        """Set config `c` to the pruned shape (used on the live model and for early export checks)."""
        c.hidden_size = target["hidden_size"]
        c.intermediate_size = target["ffn_hidden_size"]
        c.num_attention_heads = target["num_attention_heads"]
        c.num_key_value_heads = target["num_query_groups"]
        c.head_dim = target["head_dim"]  # explicit: hidden / heads no longer gives it
        c.num_hidden_layers = target["num_layers"]
        if getattr(c, "layer_types", None) is not None:
            c.layer_types = [c.layer_types[i] for i in kept_layers]
        if getattr(c, "max_window_layers", None) is not None:  # qwen2/3: sliding window from this layer on
            c.max_window_layers = sum(1 for i in kept_layers if i < c.max_window_layers)
        c.rms_norm_eps = c.rms_norm_eps * eps_scale

    # -- export ------------------------------------------------------------------------------------------------
    @staticmethod
    def stock_alternative(config):
        """An architecture-identical stock config class for shapes this model's own config class rejects.

        LlamaConfig insists hidden_size % num_attention_heads == 0 even with an explicit head_dim; MistralConfig
        with sliding_window=None computes exactly the same function when the model has no biases.
        """
        from transformers import MistralConfig, MistralForCausalLM

        c = config
        if c.model_type != "llama" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            return None
        fields = c.to_dict()
        for key in ("architectures", "model_type", "transformers_version", "attention_bias", "mlp_bias",
                    "pretraining_tp", "_name_or_path"):
            fields.pop(key, None)
        fields["sliding_window"] = None
        return MistralConfig(**fields), MistralForCausalLM
