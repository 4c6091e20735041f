"""Adapter for llama-like decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

The only file that knows these models' module names. Layout (transformers):
  model.embed_tokens -> layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj (+ q_norm, k_norm on qwen3),
  post_attention_layernorm, mlp.{gate,up,down}_proj} -> model.norm -> lm_head (tied or not).
q_proj rows are head-major ((heads, head_dim)); query head h uses KV head h // (heads / kv_heads).
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.adapters.base import Site, derive_attention_and_hidden_scores
from llmprune.plan import PruningPlan
from llmprune.slicing import slice_gqa_attention, slice_linear, slice_rmsnorm, slice_vocab_ends


class LlamaAdapter:
    """Minitron pruning for llama-like decoders."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    hidden_norms = ("input_layernorm", "post_attention_layernorm")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head applied to the last layer's output."""
        return self.model.lm_head(self.model.model.norm(hidden))

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
    def count_params(self, shape: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> int:
        """Analytic parameter count for `shape` (ModelOpt names; missing keys take the model's current sizes).
        Every layer is alike, so `kept_layers` (accepted for the hybrid adapters' sake) changes nothing."""
        s = {**self.dims(), **(shape or {})}
        h, ffn, heads, groups, hd = (s["hidden_size"], s["ffn_hidden_size"], s["num_attention_heads"],
                                     s["num_query_groups"], s["head_dim"])
        attn0, mlp0 = self.layers[0].self_attn, self.layers[0].mlp
        bias = {name: getattr(getattr(attn0, name), "bias", None) is not None for name in ("q_proj", "k_proj",
                                                                                         "v_proj", "o_proj")}
        attn = 2 * h * heads * hd + 2 * h * groups * hd
        attn += bias["q_proj"] * heads * hd + (bias["k_proj"] + bias["v_proj"]) * groups * hd + bias["o_proj"] * h
        attn += sum(getattr(attn0, n).weight.numel() for n in ("q_norm", "k_norm") if hasattr(attn0, n))
        mlp = 3 * h * ffn + (mlp0.down_proj.bias is not None) * (2 * ffn + h)
        per_layer = attn + mlp + 2 * h
        tied = self.model.lm_head.weight is self.model.model.embed_tokens.weight
        return s["vocab_size"] * h * (1 if tied else 2) + s["num_layers"] * per_layer + h

    # -- pruning -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, plan: PruningPlan) -> None:
        """Slice the model in place to `plan` and rewrite its config."""
        d, t = plan.original, plan.target
        hd = d["head_dim"]
        per_group = d["num_attention_heads"] // d["num_query_groups"]
        hidden = plan.hidden
        backbone = self.model.model
        kept = nn.ModuleList(self.layers[i] for i in plan.kept_layers)
        for new_idx, (old_idx, layer) in enumerate(zip(plan.kept_layers, kept)):
            attn, mlp = layer.self_attn, layer.mlp
            attn.layer_idx = new_idx  # KV-cache slot
            heads = plan.heads[old_idx] if plan.heads else None
            groups = plan.groups[old_idx] if plan.groups else None
            slice_gqa_attention(attn, heads, groups, hd, hidden, t["num_attention_heads"] // t["num_query_groups"])
            assert heads is None or len(heads) // len(groups) == attn.num_key_value_groups <= per_group, (heads, groups)
            ffn = plan.ffn[old_idx] if plan.ffn else None
            mlp.gate_proj = slice_linear(mlp.gate_proj, ffn, hidden)
            mlp.up_proj = slice_linear(mlp.up_proj, ffn, hidden)
            mlp.down_proj = slice_linear(mlp.down_proj, hidden, ffn)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = t["ffn_hidden_size"]
            if hidden is not None:
                for name in self.hidden_norms:
                    slice_rmsnorm(getattr(layer, name), hidden, d["hidden_size"] if plan.rescale_norms else None)
                if plan.rescale_norms:  # qwen3's per-head norms read the one shared rms_norm_eps on reload
                    for name in ("q_norm", "k_norm"):
                        if hasattr(attn, name):
                            getattr(attn, name).variance_epsilon *= d["hidden_size"] / t["hidden_size"]
            if hasattr(layer, "hidden_size"):
                layer.hidden_size = t["hidden_size"]
        backbone.layers = kept
        if hidden is not None:
            slice_vocab_ends(self.model, backbone.norm, hidden, d["hidden_size"] if plan.rescale_norms else None)
        self._rewrite_config(plan)

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

    def _rewrite_config(self, plan: PruningPlan) -> None:
        rescaled = plan.hidden is not None and plan.rescale_norms
        eps_scale = plan.original["hidden_size"] / plan.target["hidden_size"] if rescaled else 1.0
        self.rewrite_config(self.config, plan.target, plan.kept_layers, eps_scale)

    # -- export ------------------------------------------------------------------------------------------------
    def stock_alternative(self):
        """An architecture-identical stock config class for shapes this model's own config class rejects.

        LlamaConfig insists hidden_size % num_attention_heads == 0 even with an explicit head_dim; MistralConfig
        with sliding_window=None computes exactly the same function when the model has no biases.
        """
        from transformers import MistralConfig, MistralForCausalLM

        c = self.config
        if c.model_type != "llama" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            return None
        fields = c.to_dict()
        for key in ("architectures", "model_type", "transformers_version", "attention_bias", "mlp_bias",
                    "pretraining_tp", "_name_or_path"):
            fields.pop(key, None)
        fields["sliding_window"] = None
        return MistralConfig(**fields), MistralForCausalLM
