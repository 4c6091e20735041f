"""Hugging Face llama-like checkpoints (llama, mistral, qwen2, qwen3) <-> megatron-core GPTModel, split over TP ranks
and pipeline stages.

The name map below is the whole correspondence. Megatron fuses and splits some weights differently:
- linear_qkv rows are grouped by KV head: for each query group g, [its query heads; k_g; v_g] (each head_dim rows).
  Splitting these rows evenly over TP ranks gives each rank whole query groups (num_query_groups % TP == 0).
- linear_fc1 is [gate; up] *per TP rank*: rank r holds [gate rows of r; up rows of r], so the MLP's
  chunk(2) on the rank's output yields its own gate and up halves.
- linear_proj / linear_fc2 are row-parallel: their input columns (heads, FFN neurons) are split over the ranks.
- the word embeddings and the output layer are split by vocabulary rows (padded to a multiple of TP).
Norms and the q/k layernorms are replicated.
Under pipeline parallelism each stage builds and loads only its layers (layer_number stays global), the first stage
the word embeddings, the last the final norm and the output layer; with tied embeddings the last stage's output layer
is megatron's copy of the word embeddings, loaded from the same checkpoint tensor.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from llmprune.backends.megatron.parallel import Parallel, gather_stages, gather_tp, require_megatron, stage_sizes
from llmprune.errors import ConfigError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")

# megatron name under decoder.layers.{j}. -> (HF names under model.layers.{i}., TP layout)
LAYER_MAP = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                                       "qkv"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "columns"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gated"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "columns"),
}
# megatron name -> (HF names, TP layout), outside the layers
GLOBAL_MAP = {
    "embedding.word_embeddings.weight": (("model.embed_tokens.weight",), "vocab"),
    "decoder.final_layernorm.weight": (("model.norm.weight",), "replicated"),
    "output_layer.weight": (("lm_head.weight",), "vocab"),
}


# -- config ------------------------------------------------------------------------------------------------------
LLAMA31_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(c) -> dict:
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    return rope


def _rope_supported(rope: dict) -> bool:
    """Plain RoPE, or Llama-3.1's scaling with exactly the constants megatron-core implements."""
    return rope["rope_type"] == "default" or (
        rope["rope_type"] == "llama3" and all(float(rope.get(k, -1)) == v for k, v in LLAMA31_SCALING.items()))


def rope_settings(c) -> dict:
    """GPTModel's rotary arguments for HF config `c` (check_convertible rejects the RoPE types it cannot express)."""
    rope = _rope(c)
    if not _rope_supported(rope):
        raise ConfigError(f"backend=megatron: RoPE scaling {rope} is not supported; use backend=hf for this model.")
    if rope["rope_type"] == "default":
        return {"rotary_base": rope["rope_theta"], "rope_scaling": False}
    return {"rotary_base": rope["rope_theta"], "rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}


def check_convertible(c, tp: int, target: dict[str, int] | None = None, pp: int = 1) -> None:
    """Raise one ConfigError listing why HF config `c` (pruned to `target`) cannot run as a GPTModel over `tp`
    tensor-parallel ranks and `pp` pipeline stages; also when megatron-core is not installed."""
    require_megatron()
    if c.model_type not in LLAMA_LIKE:
        raise ConfigError(f"backend=megatron converts llama-like models ({', '.join(LLAMA_LIKE)}); model.path is a "
                          f"'{c.model_type}' model. Use backend=hf for it.")
    problems = []
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (megatron's gated MLP here is SwiGLU: silu)")
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias=True (an o_proj bias without MLP biases has no megatron-core equivalent)")
    if getattr(c, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True):
        problems.append(f"sliding_window={c.sliding_window} (sliding-window attention)")
    if not _rope_supported(_rope(c)):
        problems.append(f"RoPE scaling {_rope(c)} (megatron-core implements plain RoPE and Llama-3.1's llama3 "
                        f"scaling with {LLAMA31_SCALING})")
    for key, value in (("num_key_value_heads", c.num_key_value_heads), ("intermediate_size", c.intermediate_size)):
        if value % tp:
            problems.append(f"the model's {key}={value} is not a multiple of megatron.tensor_parallel_size={tp} "
                            "(each TP rank holds an equal share of query groups and FFN neurons)")
    if c.num_hidden_layers < pp:
        problems.append(f"the model's num_hidden_layers={c.num_hidden_layers} is smaller than "
                        f"megatron.pipeline_parallel_size={pp} (each pipeline stage holds at least one layer)")
    for key in ("num_query_groups", "ffn_hidden_size") if target else ():
        if target[key] % tp:
            problems.append(f"prune.export_config.{key}={target[key]} is not a multiple of "
                            f"megatron.tensor_parallel_size={tp}: a pruned layer is re-split evenly over the TP "
                            f"ranks; choose a multiple of {tp}")
    if problems:
        raise ConfigError("backend=megatron cannot run this model:\n  - " + "\n  - ".join(problems)
                          + "\nChange the targets, megatron.tensor_parallel_size or megatron.pipeline_parallel_size, "
                          "or use backend=hf.")


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def padded_vocab(c, tp: int) -> int:
    """The vocabulary rounded up to a multiple of TP (the embedding and output layer are split by rows)."""
    return math.ceil(c.vocab_size / tp) * tp


def resolve_impl(impl: str, device: torch.device) -> str:
    """local | transformer_engine; auto picks TransformerEngine on a GPU where it is installed."""
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except ImportError:
        have_te = False
    if impl == "auto":
        return "transformer_engine" if have_te and device.type == "cuda" else "local"
    if impl == "transformer_engine" and not (have_te and device.type == "cuda"):
        raise ConfigError("megatron.transformer_impl=transformer_engine needs TransformerEngine and a CUDA GPU; "
                          "use megatron.transformer_impl=local (or auto).")
    return impl


def pipeline_layout(sizes: list[int]) -> list[list[str]] | None:
    """megatron-core's pipeline_model_parallel_layout for `sizes[p]` decoder layers on stage p: any split, also an
    uneven one after pruning (a stage may keep no layers). None for one stage."""
    if len(sizes) == 1:
        return None
    layout = [["decoder"] * n for n in sizes]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def transformer_config(c, parallel: Parallel, dtype: torch.dtype, impl: str, sizes: list[int]):
    """megatron-core TransformerConfig for HF config `c` with `sizes[p]` layers on pipeline stage p: RMSNorm, SwiGLU,
    RoPE, GQA, no dropout, no fusions."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    qwen2 = c.model_type == "qwen2"
    return TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads, kv_channels=head_dim(c),
        normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=qwen2, qk_layernorm=c.model_type == "qwen3",
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp, sequence_parallel=False,
        pipeline_model_parallel_layout=pipeline_layout(sizes),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=parallel.device.type == "cpu", perform_initialization=False, transformer_impl=impl)


def layer_spec(impl: str, qk_layernorm: bool):
    """A pre-norm llama layer with separate norm modules (their outputs are Minitron's hidden-size sites), built
    from megatron-core's local modules or TransformerEngine's. Module and parameter names are the same for both."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider as Provider
    else:
        with warnings.catch_warnings():  # "Apex is not installed": its LayerNorm is not used (RMSNorm is torch's)
            warnings.simplefilter("ignore", UserWarning)
            from megatron.core.models.backends import LocalSpecProvider as Provider
    b = Provider()
    norm = b.layer_norm(rms_norm=True)
    qk_norm = b.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(
                               linear_qkv=b.column_parallel_linear(), core_attention=b.core_attention(),
                               linear_proj=b.row_parallel_linear(), q_layernorm=qk_norm, k_layernorm=qk_norm))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=b.column_parallel_linear(),
                                                          linear_fc2=b.row_parallel_linear()))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def build_model(c, parallel: Parallel, dtype: torch.dtype, impl: str, sizes: list[int] | None = None) -> nn.Module:
    """An uninitialized megatron-core GPTModel (this rank's shard: its TP slice of its pipeline stage) with the shape
    of HF config `c` and `sizes[p]` layers on stage p (default: stage_sizes' even split)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    check_convertible(c, parallel.tp)
    sizes = sizes or stage_sizes(c.num_hidden_layers, parallel.pp)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    # No embedding group: megatron would all-reduce the first stage's word embeddings into the last stage's copy (the
    # tied output layer); both copies are loaded from the checkpoint instead.
    groups.embd = None
    model = GPTModel(transformer_config(c, parallel, dtype, impl, sizes), layer_spec(impl, c.model_type == "qwen3"),
                     vocab_size=padded_vocab(c, parallel.tp), max_sequence_length=c.max_position_embeddings,
                     pre_process=parallel.pp_rank == 0, post_process=parallel.pp_rank == parallel.pp - 1,
                     parallel_output=True, share_embeddings_and_output_weights=bool(c.tie_word_embeddings),
                     position_embedding_type="rope", rotary_percent=1.0, pg_collection=groups, **rope_settings(c))
    return model.to(parallel.device).eval()


# -- layouts: full HF tensors <-> this rank's shard ----------------------------------------------------------------
def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q (heads * hd, ...), k / v (groups * hd, ...) -> megatron (groups * (heads / groups + 2) * hd, ...)."""
    tail = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *tail), k.reshape(groups, -1, *tail), v.reshape(groups, -1, *tail)],
                     dim=1).reshape(-1, *tail)  # (G, (per + 2) * hd, ...) flattened


def _qkv_split(qkv: torch.Tensor, heads: int, groups: int, hd: int) -> tuple[torch.Tensor, ...]:
    tail = qkv.shape[1:]
    per = heads // groups
    q, k, v = qkv.reshape(groups, (per + 2) * hd, *tail).split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def to_shard(layout: str, tensors: list[torch.Tensor], c, tp: int, rank: int) -> torch.Tensor:
    """This rank's megatron shard of the full HF tensors of one parameter."""
    if layout == "replicated":
        return tensors[0]
    if layout == "columns":
        return tensors[0].chunk(tp, dim=1)[rank]
    if layout == "gated":
        gate, up = tensors
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if layout == "qkv":
        return _qkv_fuse(*tensors, c.num_key_value_heads).chunk(tp)[rank]
    if layout == "vocab":
        t = tensors[0]
        pad = padded_vocab(c, tp) - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]).chunk(tp)[rank] if pad else t.chunk(tp)[rank]
    raise AssertionError(layout)


def from_shards(layout: str, shards: list[torch.Tensor], c) -> list[torch.Tensor]:
    """The full HF tensors of one parameter from every TP rank's megatron shard (in rank order)."""
    if layout == "replicated":
        return [shards[0]]
    if layout == "columns":
        return [torch.cat(shards, dim=1)]
    if layout == "gated":
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if layout == "qkv":
        return list(_qkv_split(torch.cat(shards), c.num_attention_heads, c.num_key_value_heads, head_dim(c)))
    if layout == "vocab":
        return [torch.cat(shards)[: c.vocab_size]]
    raise AssertionError(layout)


# -- per layer and whole model -------------------------------------------------------------------------------------
def _params(module: nn.Module, names) -> dict[str, nn.Parameter]:
    """`module`'s parameters among `names` (TransformerEngine keeps an empty `bias` on bias-free linears)."""
    own = {name: p for name, p in module.named_parameters() if p.numel()}
    return {name: own[name] for name in names if name in own}


def to_hf(module: nn.Module, name_map: dict, c, parallel: Parallel) -> dict[str, torch.Tensor]:
    """The full HF tensors of `module`'s parameters in `name_map` (LAYER_MAP for one decoder layer, keyed by HF
    names under model.layers.{i}.; GLOBAL_MAP for the model), TP shards gathered."""
    out = {}
    for name, param in _params(module, name_map).items():
        hf_names, layout = name_map[name]
        shards = [param.detach()] if layout == "replicated" else gather_tp(param.detach(), parallel)
        out.update(zip(hf_names, from_shards(layout, shards, c)))
    return out


@torch.no_grad()
def from_hf(module: nn.Module, name_map: dict, tensors: dict[str, torch.Tensor], c, parallel: Parallel) -> set[str]:
    """Copy full HF tensors into this rank's shards of `module`'s parameters in `name_map`; returns the HF names
    used."""
    used = set()
    for name, param in _params(module, name_map).items():
        hf_names, layout = name_map[name]
        shard = to_shard(layout, [tensors[n] for n in hf_names], c, parallel.tp, parallel.tp_rank)
        assert shard.shape == param.shape, (name, tuple(shard.shape), tuple(param.shape))
        param.copy_(shard)
        used.update(hf_names)
    return used


def layer_index(layer: nn.Module) -> int:
    """The global (HF) index of a megatron layer: layer_number counts from 1 over all pipeline stages."""
    return layer.layer_number - 1


def load_hf_state(model: nn.Module, state: dict[str, torch.Tensor], c, parallel: Parallel) -> None:
    """Fill this rank's shard of `model` (its pipeline stage) from a full HF state dict; every HF tensor of the stage's
    layers must find its place, and nothing outside the layers may be other than the embeddings, final norm and
    LM head."""
    used, own = set(), set()
    for layer in model.decoder.layers:
        prefix = f"model.layers.{layer_index(layer)}."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        used |= {prefix + k for k in from_hf(layer, LAYER_MAP, tensors, c, parallel)}
        own |= {prefix + k for k in tensors}
    used |= from_hf(model, GLOBAL_MAP, state, c, parallel)
    outside = {k for k in state if not k.startswith("model.layers.")}
    known = {name for hf_names, _ in GLOBAL_MAP.values() for name in hf_names}
    left = sorted((own - used) | (outside - known))
    assert not left, f"HF weights without a megatron place: {left[:8]}"


def to_hf_state(model: nn.Module, c, parallel: Parallel) -> dict[str, torch.Tensor]:
    """The full HF state dict of `model` on every rank, on the CPU: TP shards gathered, then every pipeline stage's
    tensors (with tied embeddings, the first stage's word embeddings; the last stage's copy is left out)."""
    state = {}
    for layer in model.decoder.layers:
        state.update({f"model.layers.{layer_index(layer)}.{k}": v.cpu()
                      for k, v in to_hf(layer, LAYER_MAP, c, parallel).items()})
    state.update({k: v.cpu() for k, v in to_hf(model, GLOBAL_MAP, c, parallel).items()})
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return gather_stages(state, parallel)


def hf_model(c, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A stock transformers model of config `c` holding `state` (tied embeddings stay tied)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(c, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if c.tie_word_embeddings else set()), (
        missing, unexpected)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
