"""Adapter for megatron-core GPTModel converted from a llama-like HF model (backend=megatron), under TP, PP >= 1.

The only file that knows megatron-core's module names. Layout (local or TransformerEngine layers alike):
  embedding.word_embeddings -> decoder.layers[j].{input_layernorm, self_attention.{linear_qkv, q_layernorm,
  k_layernorm, core_attention, linear_proj}, pre_mlp_layernorm, mlp.{linear_fc1, linear_fc2}}
  -> decoder.final_layernorm -> output_layer (or the word embeddings, tied).
Activations are sequence-first, (S, B, C). Under tensor parallelism each rank holds whole query groups and a
contiguous block of FFN neurons, so the inputs of linear_proj and linear_fc2 are per-rank channel slices: their
scores are concatenated in TP-rank order, which is the global channel order. The norms' outputs are replicated
(no sequence parallelism), so hidden scores need no gathering. Every rank of a model replica sees the same samples;
sums run over the data-parallel group only.

Under pipeline parallelism each stage holds a block of layers (`stages`, global layer indices): a forward pass
embeds on the first stage and hands the (S, B, H) hidden states from stage to stage with point-to-point sends
(forward only, one batch at a time); each stage scores its own layers and derive_scores gathers every stage's
score vectors onto every rank, so the plan is the one a single stage would make.

Pruning gathers a layer's full weights in Hugging Face layout, slices them with the llama pruning map (the one the
HF backend and streaming use, so all three give the same bits), and writes them into a GPTModel rebuilt at the
pruned shape (megatron modules cache their per-partition sizes), re-split evenly over the TP ranks; removed layers
are left out and layer_number is renumbered. Each pipeline stage keeps its own surviving layers (the new split may
be uneven); to_hf gathers every stage's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmprune.adapters.base import Site, derive_attention_and_hidden_scores
from llmprune.adapters.llama import PRUNING_MAP, LlamaAdapter
from llmprune.backends.megatron import convert
from llmprune.backends.megatron.parallel import (
    Parallel,
    close,
    gather_stages,
    gather_tp,
    init_model_parallel,
    stage_sizes,
)
from llmprune.errors import ConfigError
from llmprune.plan import PruningPlan
from llmprune.pruning.apply import eps_scale


class MegatronGPTAdapter:
    """Minitron pruning of a megatron-core GPTModel (llama-like), mirroring LlamaAdapter."""

    family = "megatron_gpt"
    model_types: tuple[str, ...] = ()  # chosen by backend=megatron, not by a config's model_type
    seq_first = True  # activations are (S, B, C)
    hidden_norms = ("input_layernorm", "pre_mlp_layernorm")

    def __init__(self, model: nn.Module, hf_config, parallel: Parallel, impl: str = "local",
                 sizes: list[int] | None = None):
        self.model = model
        self.config = hf_config  # the HF config the model converts back to; apply() rewrites it
        self.parallel = parallel
        self.impl = impl
        # layers per pipeline stage; the split apply() leaves may be uneven
        self.stages = parallel.stages(sizes or stage_sizes(hf_config.num_hidden_layers, parallel.pp))

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                transformer_impl: str = "auto", seed: int = 0) -> MegatronGPTAdapter:
        """Convert a loaded llama / mistral / qwen2 / qwen3 model into this rank's GPTModel shard.

        Sets up megatron-core's process groups first (see megatron/parallel.py); every rank passes the full model.
        Pipeline stages split the layers evenly (the first stages take one more where they do not divide).
        """
        c = copy.deepcopy(hf_model.config)
        convert.check_convertible(c, tensor_parallel_size, pp=pipeline_parallel_size)
        parallel = init_model_parallel(tensor_parallel_size, pipeline_parallel_size, seed)
        impl = convert.resolve_impl(transformer_impl, parallel.device)
        model = convert.build_model(c, parallel, hf_model.dtype, impl)
        convert.load_hf_state(model, hf_model.state_dict(), c, parallel)  # copies only this rank's shards across
        return cls(model, c, parallel, impl)

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.decoder.layers

    @property
    def data_parallel_group(self):
        """Score sums run over this group: the ranks of one model replica (TP x PP) share their samples."""
        return self.parallel.dp_group

    @property
    def dtype(self) -> torch.dtype:
        return self.model.config.params_dtype

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = False) -> torch.Tensor:
        """Embeddings, RoPE and the decoder with its final norm (no output layer); returns (S, B, H).

        Under pipeline parallelism every stage of the replica calls this with the same batch: the first embeds, the
        others start from the previous stage's hidden states; each hands its output on. Returns this stage's output
        (the final-normed hidden states on the last stage)."""
        batch, seq = input_ids.shape
        hidden = None
        if self.stages.first:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            hidden = self.model.embedding(input_ids=input_ids, position_ids=positions)  # (S, B, H)
        else:
            self.model.decoder.set_input_tensor(self.stages.recv_prev())  # (S, B, H) from the previous stage
        rotary = self.model.rotary_pos_emb(seq)  # (S, 1, 1, head_dim)
        out = self.model.decoder(hidden_states=hidden, attention_mask=self._mask(attention_mask, seq, input_ids.device),
                                 rotary_pos_emb=rotary)
        if not self.stages.last:
            self.stages.send_next(out)
        return out

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """GPTModel's whole forward: full-vocabulary logits (B, S, V), the TP shards gathered. Under pipeline
        parallelism every stage calls it; the last stage returns the logits, the others None."""
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if not self.stages.first:
            self.model.set_input_tensor(self.stages.recv_prev())
        out = self.model(input_ids, positions, self._mask(attention_mask, seq, input_ids.device),
                         runtime_gather_output=True)  # (B, S, padded V); (S, B, H) before the last stage
        if not self.stages.last:
            self.stages.send_next(out)
            return None
        return out[..., : self.config.vocab_size]

    def _mask(self, attention_mask: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor | None:
        """megatron's boolean mask (True = masked), (B or 1, 1, S, S). Local layers get the causal mask explicitly
        (their own default is built on 'cuda'); TransformerEngine applies causality itself."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if self.impl == "transformer_engine":
            if padded:
                raise ConfigError("padded batches need megatron.transformer_impl=local; calibration data is packed "
                                  "(no padding) in recipes.")
            return None
        mask = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]  # (1, 1, S, S)
        if padded:
            mask = mask | ~attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, S, S)
        return mask

    def dims(self) -> dict[str, int]:
        """Current sizes, by ModelOpt name (the whole model, not this rank's shard)."""
        c = self.model.config
        return {"hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
                "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_query_groups,
                "num_layers": c.num_layers, "head_dim": c.kv_channels, "vocab_size": self.config.vocab_size}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer on the last layer's output (B, S, H) -> full-vocabulary logits (B, S, V).
        The last pipeline stage's (it holds the final norm and the output layer)."""
        m = self.model
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(m.decoder.final_layernorm(hidden), weight=weight, runtime_gather_output=True)
        return logits[..., : self.config.vocab_size]  # drop the TP padding of the vocabulary

    def importance_sites(self) -> list[Site]:
        """Inputs of linear_fc2 / linear_proj (this rank's channels) and both norms' outputs, per layer of this
        pipeline stage (named by global layer index)."""
        sites = []
        for layer in self.layers:
            i = convert.layer_index(layer)
            sites.append(Site(f"ffn.{i}", layer.mlp.linear_fc2, "input"))
            sites.append(Site(f"attn.{i}", layer.self_attention.linear_proj, "input"))
            for norm in self.hidden_norms:
                sites.append(Site(f"hidden.{i}.{norm}", getattr(layer, norm), "output"))
        return sites

    def derive_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Concatenate the TP ranks' FFN and head-channel scores (rank order = channel order), gather every pipeline
        stage's layers (stage order = layer order, so the hidden score sums over the layers as with one stage), then
        as HF."""
        full = {}
        for name, value in raw.items():
            if name.startswith(("ffn.", "attn.")) and self.parallel.tp > 1:
                value = torch.cat(gather_tp(value.to(self.parallel.device), self.parallel)).cpu()
            full[name] = value
        return derive_attention_and_hidden_scores(gather_stages(full, self.parallel), self.dims())

    # -- parameter count ---------------------------------------------------------------------------------------
    def count_params(self, shape: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> int:
        """Analytic parameter count of the whole model (all TP shards, without vocabulary padding) at `shape`."""
        c = self.model.config
        s = {**self.dims(), **(shape or {})}
        h, ffn, heads, groups, hd = (s["hidden_size"], s["ffn_hidden_size"], s["num_attention_heads"],
                                     s["num_query_groups"], s["head_dim"])
        attn = 2 * h * heads * hd + 2 * h * groups * hd
        attn += c.add_qkv_bias * (heads + 2 * groups) * hd + c.qk_layernorm * 2 * hd
        per_layer = attn + 3 * h * ffn + 2 * h
        tied = self.model.share_embeddings_and_output_weights
        return s["vocab_size"] * h * (1 if tied else 2) + s["num_layers"] * per_layer + h

    # -- pruning -----------------------------------------------------------------------------------------------
    rewrite_config = staticmethod(LlamaAdapter.rewrite_config)  # the HF config the model exports to

    stock_alternative = staticmethod(LlamaAdapter.stock_alternative)  # of the HF config the model exports to

    @torch.no_grad()
    def apply(self, plan: PruningPlan) -> None:
        """Prune to `plan`: self.model becomes a GPTModel of the pruned shape holding the kept weights. Every pipeline
        stage keeps its own surviving layers (renumbered globally) and prunes the embeddings / final norm / output
        layer it holds."""
        if plan.is_empty and plan.kept_layers == list(range(self.stages.num_layers)):
            return
        t = plan.target
        config = copy.deepcopy(self.config)
        self.rewrite_config(config, t, plan.kept_layers, eps_scale(plan))
        starts = self.stages.starts
        sizes = [sum(starts[p] <= i < starts[p + 1] for i in plan.kept_layers) for p in range(self.stages.count)]
        old, new = self.model, convert.build_model(config, self.parallel, self.dtype, self.impl, sizes)
        old_layers = {convert.layer_index(layer): layer for layer in old.decoder.layers}
        kept_here = [i for i in plan.kept_layers if i in old_layers]  # this stage's survivors, in order
        for new_layer, i in zip(new.decoder.layers, kept_here, strict=True):
            tensors = convert.to_hf(old_layers[i], convert.LAYER_MAP, self.config, self.parallel)  # the whole layer
            prefix = PRUNING_MAP.layers.format(i=i)  # the HF adapter's map, on the HF names of this layer's tensors
            tensors = {name: PRUNING_MAP.prune_tensor(prefix + name, t, plan)[1] for name, t in tensors.items()}
            convert.from_hf(new_layer, convert.LAYER_MAP, tensors, config, self.parallel)
        tensors = convert.to_hf(old, convert.GLOBAL_MAP, self.config, self.parallel)  # those this stage holds
        tensors = {name: PRUNING_MAP.prune_tensor(name, t, plan)[1] for name, t in tensors.items()}
        convert.from_hf(new, convert.GLOBAL_MAP, tensors, config, self.parallel)
        self.model, self.config, self.stages = new, config, self.parallel.stages(sizes)


    # -- export ------------------------------------------------------------------------------------------------
    def to_hf(self, like: nn.Module) -> nn.Module:
        """The model as a stock transformers model with full weights on every rank (every TP shard and pipeline
        stage gathered), in the dtype, on the device and with the generation config of `like` (the HF model it was
        converted from)."""
        state = convert.to_hf_state(self.model, self.config, self.parallel)
        model = convert.hf_model(copy.deepcopy(self.config), state, like.dtype).to(like.device)
        model.generation_config = copy.deepcopy(like.generation_config)
        return model.requires_grad_(False)

    def close(self) -> None:
        """Release the GPTModel and megatron-core's process groups (and the default group where from_hf made it)."""
        self.model = None
        close(self.parallel)
