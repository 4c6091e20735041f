"""Adapters for the GradNAS families: BERT-style encoders and GPT-J.

GradNAS removes attention heads and FFN neurons per layer and keeps the hidden size and the layer count; these
adapters describe the models for that: sizes, the pruning map the cost model reads (parameters and FLOPs of any
per-layer choice), and where the head and neuron masks go (the inputs of the attention and FFN output projections).
Minitron's activation hooks and its uniform-width rebuild are not offered here (`ConfigError` names the mode to use).

Layouts (transformers 5):
  BERT   [bert.]embeddings.{word,position,token_type}_embeddings, LayerNorm -> encoder.layer[i].attention.self.
         {query,key,value} -> attention.output.{dense,LayerNorm} -> intermediate.dense -> output.{dense,LayerNorm}
         -> [pooler.dense] (first token) / [cls.predictions.{transform.dense, transform.LayerNorm, decoder}].
  GPT-J  transformer.wte -> h[i].ln_1 -> attn.{q,k,v,out}_proj (no biases) in parallel with mlp.{fc_in,fc_out}
         -> transformer.ln_f -> lm_head (with bias, untied).
"""

from __future__ import annotations

from torch import nn

from llmprune.adapters.base import HFAdapter
from llmprune.errors import ConfigError
from llmprune.plan.cost import CostModel, parameter_shapes
from llmprune.pruning.map import PruningMap, Rule


def _bert_rules(p: str) -> tuple[Rule, ...]:
    """BERT with its parameters under prefix `p` ("" for BertModel, "bert." under a task head)."""
    layer = p + "encoder.layer.{i}."
    return (
        Rule(p + "embeddings.word_embeddings.weight", (None, "hidden")),
        Rule(p + "embeddings.position_embeddings.weight", (None, "hidden")),
        Rule(p + "embeddings.token_type_embeddings.weight", (None, "hidden")),
        Rule(p + "embeddings.LayerNorm.weight", ("hidden",)),
        Rule(p + "embeddings.LayerNorm.bias", ("hidden",)),
        Rule(layer + "attention.self.query.weight", ("q", "hidden"), matmul=True),
        Rule(layer + "attention.self.query.bias", ("q",)),
        Rule(layer + "attention.self.key.weight", ("kv", "hidden"), matmul=True),
        Rule(layer + "attention.self.key.bias", ("kv",)),
        Rule(layer + "attention.self.value.weight", ("kv", "hidden"), matmul=True),
        Rule(layer + "attention.self.value.bias", ("kv",)),
        Rule(layer + "attention.output.dense.weight", ("hidden", "q"), matmul=True, kind="attention"),
        Rule(layer + "attention.output.dense.bias", ("hidden",)),
        Rule(layer + "attention.output.LayerNorm.weight", ("hidden",)),
        Rule(layer + "attention.output.LayerNorm.bias", ("hidden",)),
        Rule(layer + "intermediate.dense.weight", ("ffn", "hidden"), matmul=True),
        Rule(layer + "intermediate.dense.bias", ("ffn",)),
        Rule(layer + "output.dense.weight", ("hidden", "ffn"), matmul=True),
        Rule(layer + "output.dense.bias", ("hidden",)),
        Rule(layer + "output.LayerNorm.weight", ("hidden",)),
        Rule(layer + "output.LayerNorm.bias", ("hidden",)),
        Rule(p + "pooler.dense.weight", ("hidden", "hidden"), matmul="first"),
        Rule(p + "pooler.dense.bias", ("hidden",)),
        Rule("cls.predictions.transform.dense.weight", ("hidden", "hidden"), matmul=True),
        Rule("cls.predictions.transform.dense.bias", ("hidden",)),
        Rule("cls.predictions.transform.LayerNorm.weight", ("hidden",)),
        Rule("cls.predictions.transform.LayerNorm.bias", ("hidden",)),
        Rule("cls.predictions.decoder.weight", (None, "hidden"), matmul=True),
        Rule("cls.predictions.decoder.bias", (None,)),
        Rule("cls.predictions.bias", (None,)),
        Rule("classifier.weight", (None, "hidden"), matmul="first"),  # sequence classification: on the pooled token
        Rule("classifier.bias", (None,)),
    )


GPTJ_MAP = PruningMap(
    rules=(
        Rule("transformer.wte.weight", (None, "hidden")),
        Rule("transformer.h.{i}.ln_1.weight", ("hidden",)),
        Rule("transformer.h.{i}.ln_1.bias", ("hidden",)),
        Rule("transformer.h.{i}.attn.q_proj.weight", ("q", "hidden"), matmul=True),
        Rule("transformer.h.{i}.attn.k_proj.weight", ("kv", "hidden"), matmul=True),
        Rule("transformer.h.{i}.attn.v_proj.weight", ("kv", "hidden"), matmul=True),
        Rule("transformer.h.{i}.attn.out_proj.weight", ("hidden", "q"), matmul=True, kind="attention"),
        Rule("transformer.h.{i}.mlp.fc_in.weight", ("ffn", "hidden"), matmul=True),
        Rule("transformer.h.{i}.mlp.fc_in.bias", ("ffn",)),
        Rule("transformer.h.{i}.mlp.fc_out.weight", ("hidden", "ffn"), matmul=True),
        Rule("transformer.h.{i}.mlp.fc_out.bias", ("hidden",)),
        Rule("transformer.ln_f.weight", ("hidden",)),
        Rule("transformer.ln_f.bias", ("hidden",)),
        Rule("lm_head.weight", (None, "hidden"), matmul=True),
        Rule("lm_head.bias", (None,)),
    ),
    layers="transformer.h.{i}.",
    tied=("lm_head.weight", "transformer.wte.weight"),
)


def shared_aliases(model: nn.Module) -> tuple[str, ...]:
    """State-dict names whose tensor an earlier name already holds (tied weights), so costs count it once."""
    seen, aliases = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.append(name)
        seen.add(id(tensor))
    return tuple(aliases)


class GradNASAdapter(HFAdapter):
    """What the BERT and GPT-J adapters share: per-layer heads and FFN neurons, hidden size and depth fixed (the
    masks' sites are in importance/gradnas.py)."""

    def cost_model(self) -> CostModel:
        return CostModel(self.pruning_map(), parameter_shapes(self.model), self.dims(),
                         aliases=shared_aliases(self.model))

    def _minitron_only(self, *_, **__):
        raise ConfigError(f"prune.mode=minitron does not support the {self.family} family; use prune.mode=gradnas "
                          "(gradient scores of heads and FFN neurons under prune.constraints).")

    importance_sites = derive_scores = prunable_weights = apply = _minitron_only


class BertAdapter(GradNASAdapter):
    """BERT-style encoders: BertModel (sentence encoders such as MiniLM), BertForMaskedLM, sequence classifiers."""

    family = "bert"
    model_types = ("bert",)

    @property
    def prefix(self) -> str:
        return "" if self.model is self.model.base_model else self.model.base_model_prefix + "."

    def pruning_map(self) -> PruningMap:
        return PruningMap(rules=_bert_rules(self.prefix), layers=self.prefix + "encoder.layer.{i}.")

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.base_model.encoder.layer

    def dims(self) -> dict[str, int]:
        c = self.config
        return {"hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
                "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_attention_heads,
                "num_layers": c.num_hidden_layers, "head_dim": c.hidden_size // c.num_attention_heads,
                "vocab_size": c.vocab_size}


class GPTJAdapter(GradNASAdapter):
    """GPT-J (GPTJForCausalLM): attention and MLP in parallel from one LayerNorm, rotary on part of each head."""

    family = "gptj"
    model_types = ("gptj",)

    @staticmethod
    def pruning_map() -> PruningMap:
        return GPTJ_MAP

    @property
    def backbone(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def dims(self) -> dict[str, int]:
        c = self.config
        return {"hidden_size": c.n_embd, "ffn_hidden_size": c.n_inner or 4 * c.n_embd,
                "num_attention_heads": c.n_head, "num_query_groups": c.n_head, "num_layers": c.n_layer,
                "head_dim": c.n_embd // c.n_head, "vocab_size": c.vocab_size}
