"""Per-layer (GradNAS) pruning of BERT-style encoders, GPT-J and llama-like decoders: zeroing, physical slicing,
and export.

GradNAS removes attention heads and FFN neurons per layer, so layer 0 may keep 7 of 12 heads and layer 1 all 12.
`heads` and `ffn` are `PruningPlan.heads` / `PruningPlan.ffn`: original layer index -> sorted kept query-head / FFN
neuron indices (an absent layer keeps all). The hidden size and the layer count never change. Under grouped-query
attention (llama, mistral, qwen2, qwen3) the kept query heads are whole groups (query head h reads KV head
h // (heads / kv_heads)), and a layer keeps the KV heads of its kept groups.

Three views of one pruned model, with equal outputs:
  - `zero_pruned_units`: the original shapes, every removed unit's weights zeroed (the reference).
  - `physically_pruned`: the real per-layer shapes (for ONNX and the effective parameter count). Stock configs
    cannot describe it (one head count and one intermediate size for all layers), so it cannot be saved as such.
  - `write_encoder_export`: a stock-transformers directory (FFN as wide as the widest kept layer, narrower layers
    padded with zero neurons; removed heads zero-filled), plus sentence-transformers files and `onnx/model.onnx`.

A layer may keep 0 heads or 0 neurons: its attention (FFN) then adds only the output projection's bias (if any),
which is what a zero-width nn.Linear computes (see `NoHeads` for why BERT's attention over zero heads is replaced).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.export import Dim

from llmprune.errors import ConfigError
from llmprune.export.hf import atomic_directory

log = logging.getLogger("llmprune")
Kept = Mapping[int, Sequence[int]] | None

# Per family, HF module names inside one layer of `model.base_model`; `attention` is the module that splits heads,
# `ffn_in` the FFN's input projections (a gated MLP has two: gate and up), `ffn_config` the config key of its width.
_LLAMA = {"layers": "layers", "attention": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
          "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ffn_in": ("mlp.gate_proj", "mlp.up_proj"),
          "ffn_out": "mlp.down_proj", "ffn_config": "intermediate_size"}
FAMILIES = {
    "bert": {"layers": "encoder.layer", "attention": "attention.self", "q": "attention.self.query",
             "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense",
             "ffn_in": ("intermediate.dense",), "ffn_out": "output.dense", "ffn_config": "intermediate_size"},
    "gptj": {"layers": "h", "attention": "attn", "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj",
             "o": "attn.out_proj", "ffn_in": ("mlp.fc_in",), "ffn_out": "mlp.fc_out", "ffn_config": "n_inner"},
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
}
# Files of the source's Transformer module that the export rewrites (weights, config) or cannot keep (other backends).
_REWRITTEN = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "rust_model.ot", "onnx", "openvino"}


def _family(model: nn.Module) -> dict:
    family = model.config.model_type
    if family not in FAMILIES:
        raise ConfigError(f"Per-layer encoder export does not know model_type '{family}'. "
                          f"Known: {', '.join(FAMILIES)}.")
    return FAMILIES[family]


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(_family(model)["layers"])


def _head_dim(model: nn.Module) -> int:
    """llama-like configs may set head_dim apart from hidden / heads (qwen3); BERT and GPT-J configs have none."""
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


def _heads_per_group(model: nn.Module) -> int:
    """Query heads per KV head: 1 without grouped-query attention."""
    c = model.config
    return c.num_attention_heads // (getattr(c, "num_key_value_heads", None) or c.num_attention_heads)


def _ffn_width(model: nn.Module) -> int:
    return _layers(model)[0].get_submodule(_family(model)["ffn_in"][0]).out_features


def check_kept(model: nn.Module, heads: Kept, ffn: Kept) -> None:
    """Raise one ConfigError listing every layer index or kept index that does not fit `model`."""
    num_layers, num_heads, width = len(_layers(model)), model.config.num_attention_heads, _ffn_width(model)
    per_group = _heads_per_group(model)
    problems = []
    for name, kept, size in (("heads", heads, num_heads), ("ffn", ffn, width)):
        for layer, idx in (kept or {}).items():
            if not 0 <= layer < num_layers:
                problems.append(f"{name}[{layer}]: the model has layers 0..{num_layers - 1}.")
            elif list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < size):
                problems.append(f"{name}[{layer}] must be sorted, distinct indices in 0..{size - 1}; got {list(idx)}.")
            elif name == "heads" and list(idx) != _kept_heads(_kept_groups(idx, per_group), per_group):
                problems.append(f"heads[{layer}] must keep whole query groups of {per_group} heads (query head h "
                                f"reads KV head h // {per_group}); got {list(idx)}.")
    if problems:
        raise ConfigError("Invalid kept units for per-layer pruning:\n  - " + "\n  - ".join(problems))


def _kept_channels(kept_heads: Sequence[int], head_dim: int) -> list[int]:
    """Rows of q/k/v (columns of the output projection) that belong to the kept heads."""
    return [h * head_dim + d for h in kept_heads for d in range(head_dim)]


def _kept_groups(kept_heads: Sequence[int], per_group: int) -> list[int]:
    """The KV heads that the kept query heads read."""
    return sorted({h // per_group for h in kept_heads})


def _kept_heads(groups: Sequence[int], per_group: int) -> list[int]:
    """Every query head of the kept groups."""
    return [g * per_group + j for g in groups for j in range(per_group)]


class LayerKept(NamedTuple):
    """One layer's kept channels: q rows (= output-projection columns), k / v rows, FFN neurons."""

    layer: nn.Module
    q: list[int]
    kv: list[int]
    ffn: list[int]


def _per_layer(model: nn.Module, heads: Kept, ffn: Kept) -> list[LayerKept]:
    """The kept channels of every layer, with absent layers keeping everything."""
    check_kept(model, heads, ffn)
    num_heads, head_dim, width = model.config.num_attention_heads, _head_dim(model), _ffn_width(model)
    per_group = _heads_per_group(model)
    heads, ffn = heads or {}, ffn or {}
    out = []
    for i, layer in enumerate(_layers(model)):
        kept_heads = heads.get(i, range(num_heads))
        out.append(LayerKept(layer, _kept_channels(kept_heads, head_dim),
                             _kept_channels(_kept_groups(kept_heads, per_group), head_dim),
                             list(ffn.get(i, range(width)))))
    return out


def _zero_removed(linear: nn.Linear, kept: list[int], dim: int) -> None:
    """Zero the output rows (dim 0, with their bias) or input columns (dim 1) of `linear` not listed in `kept`."""
    removed = torch.ones(linear.weight.shape[dim], dtype=torch.bool)
    removed[kept] = False
    removed = removed.to(linear.weight.device)
    if dim == 0:
        linear.weight[removed] = 0
        if linear.bias is not None:
            linear.bias[removed] = 0
    else:
        linear.weight[:, removed] = 0


@torch.no_grad()
def zero_pruned_units(model: nn.Module, heads: Kept, ffn: Kept) -> nn.Module:
    """A copy of `model` (the original is untouched) in which every removed head and FFN neuron adds nothing.

    A removed head's q rows and biases and its output-projection columns are zeroed (with its k / v rows once its
    whole group is removed), a removed neuron's input rows (gate and up in a gated MLP), biases and output column:
    the output columns alone already make the unit contribute exactly zero, zeroing the inputs too leaves no stale
    weights behind. Equal to the truly pruned model up to float summation order.
    """
    names = _family(model)
    zeroed = copy.deepcopy(model)
    for kept in _per_layer(zeroed, heads, ffn):
        layer = kept.layer
        for proj, rows in (("q", kept.q), ("k", kept.kv), ("v", kept.kv)):
            _zero_removed(layer.get_submodule(names[proj]), rows, dim=0)
        _zero_removed(layer.get_submodule(names["o"]), kept.q, dim=1)
        for name in names["ffn_in"]:
            _zero_removed(layer.get_submodule(name), kept.ffn, dim=0)
        _zero_removed(layer.get_submodule(names["ffn_out"]), kept.ffn, dim=1)
    return zeroed


def _sliced(linear: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None,
            pad_rows: int = 0, pad_cols: int = 0) -> nn.Linear:
    """A new nn.Linear keeping `rows` (outputs, with their bias) and `cols` (inputs) of `linear`, in that order,
    followed by `pad_rows` / `pad_cols` zero rows / columns."""
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    weight = nn.functional.pad(weight, (0, pad_cols, 0, pad_rows))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(nn.functional.pad(bias, (0, pad_rows)).clone(), requires_grad=linear.bias.requires_grad)
    return out


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent), child, module)


class NoHeads(nn.Module):
    """BERT self-attention that keeps no head: returns the empty concatenation of heads, (B, T, 0), which the
    zero-column output projection maps to its bias. The stock module computes the same in torch, but its exported
    graph fails in onnxruntime (a Reshape of the empty (B*0, T, T) attention scores)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states[..., :0], None


@torch.no_grad()
def physically_pruned(model: nn.Module, heads: Kept, ffn: Kept) -> nn.Module:
    """A copy of `model` with the real per-layer shapes: q/k/v rows, output-projection columns and FFN neurons of
    removed units are cut out of each layer's nn.Linear weights and biases.

    The attention forward of transformers 5 (BertSelfAttention, GPTJAttention, LlamaAttention and its mistral /
    qwen2 / qwen3 copies) infers the head count from the projection's width (`view(..., -1, head_dim)`) and reads
    only the unchanged head size and `scaling`; llama's also reads `num_key_value_groups` (query heads per KV
    head), which whole kept groups leave unchanged, and qwen3's q_norm / k_norm act on head_dim. The head-count
    attributes BERT and GPT-J carry (`num_attention_heads`, BERT's `all_head_size`) are still set per layer so no
    reader sees the original count. A BERT layer that keeps no head gets `NoHeads`; GPT-J's and llama's stock
    attention run with zero heads as is (eager and sdpa; the KV cache then holds zero heads for the layer).
    `model.config` keeps the original sizes: this model is for inference, ONNX and parameter counting, not for
    `save_pretrained` (use `write_encoder_export`).
    """
    names = _family(model)
    pruned = copy.deepcopy(model)
    head_dim = _head_dim(model)
    for kept in _per_layer(pruned, heads, ffn):
        layer = kept.layer
        _replace(layer, names["o"], _sliced(layer.get_submodule(names["o"]), cols=kept.q))
        for name in names["ffn_in"]:
            _replace(layer, name, _sliced(layer.get_submodule(name), rows=kept.ffn))
        _replace(layer, names["ffn_out"], _sliced(layer.get_submodule(names["ffn_out"]), cols=kept.ffn))
        if not kept.q and model.config.model_type == "bert":
            _replace(layer, names["attention"], NoHeads())
            continue
        for proj, rows in (("q", kept.q), ("k", kept.kv), ("v", kept.kv)):
            _replace(layer, names[proj], _sliced(layer.get_submodule(names[proj]), rows=rows))
        attention = layer.get_submodule(names["attention"])
        if hasattr(attention, "num_attention_heads"):
            attention.num_attention_heads = len(kept.q) // head_dim
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = len(kept.q)
    return pruned


@torch.no_grad()
def padded_for_stock_config(model: nn.Module, heads: Kept, ffn: Kept) -> nn.Module:
    """A copy that a stock config of the model's own class describes: removed heads (and the KV heads of removed
    groups) zero-filled (the config has one head count), and the FFN as wide as the widest kept layer, each layer's
    kept neurons first and the rest zero neurons (zero input rows, biases and output column, so they add nothing
    whatever the activation)."""
    names = _family(model)
    padded = zero_pruned_units(model, heads, ffn)
    kept = _per_layer(padded, heads, ffn)
    width = max(len(k.ffn) for k in kept)
    for k in kept:
        pad = width - len(k.ffn)
        for name in names["ffn_in"]:
            _replace(k.layer, name, _sliced(k.layer.get_submodule(name), rows=k.ffn, pad_rows=pad))
        _replace(k.layer, names["ffn_out"], _sliced(k.layer.get_submodule(names["ffn_out"]), cols=k.ffn,
                                                   pad_cols=pad))
    setattr(padded.config, names["ffn_config"], width)
    return padded


def count_params(model: nn.Module) -> int:
    """Parameters of `model`, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


class _LastHiddenState(nn.Module):
    """The encoder's forward as ONNX (and optimum's ORTModelForFeatureExtraction) see it: three tensors in,
    last_hidden_state out."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state  # (B, T, H)


@torch.no_grad()
def export_onnx(encoder: nn.Module, path: Path) -> str:
    """Write `encoder` (a BERT-family base model, e.g. from `physically_pruned`) to `path` with inputs input_ids,
    attention_mask, token_type_ids (dynamic batch and sequence) and output last_hidden_state; return the exporter.

    The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript) traces the per-layer
    widths as plain tensor shapes and handles transformers 5's mask construction (torch 2.13: it works, ~5 s for
    MiniLM-L6). The TorchScript exporter, whose graph is equally exact here, is the fallback for torch builds whose
    dynamo path fails. `optimize=False` keeps the weights' PyTorch names (the optimizer renames them); onnxruntime
    optimizes the graph when it loads it. Weights are embedded in the file (encoders are far below protobuf's 2 GB).
    """
    wrapper = _LastHiddenState(encoder).eval()
    device = next(encoder.parameters()).device
    # batch 2, sequence 8: torch.export specializes sizes 0 and 1, so the example must not use them
    example = (torch.ones(2, 8, dtype=torch.long, device=device), torch.ones(2, 8, dtype=torch.long, device=device),
               torch.zeros(2, 8, dtype=torch.long, device=device))
    inputs, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"]
    batch, sequence = Dim("batch_size"), Dim("sequence_length")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(wrapper, example, str(path), input_names=inputs, output_names=outputs, dynamo=True,
                          dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs},
                          external_data=False, optimize=False, verbose=False)
        return "dynamo"
    except Exception as err:  # noqa: BLE001 - any failure of the newer exporter falls back to the TorchScript one
        log.warning("torch.onnx.export(dynamo=True) failed (%s); using the TorchScript exporter", err)
        axes = {name: {0: "batch_size", 1: "sequence_length"} for name in inputs + outputs}
        torch.onnx.export(wrapper, example, str(path), input_names=inputs, output_names=outputs, dynamo=False,
                          dynamic_axes=axes, opset_version=17)
        return "torchscript"


def _transformer_path(source_dir: Path) -> str:
    """The folder (relative to `source_dir`) of the sentence-transformers Transformer module: '' for the usual
    layout, '0_Transformer' for older ones."""
    modules = json.loads((source_dir / "modules.json").read_text())
    paths = [m["path"] for m in modules if m["type"].endswith(".Transformer")]
    if len(paths) != 1:
        raise ConfigError(f"{source_dir}/modules.json should list exactly one sentence_transformers Transformer "
                          f"module; found {len(paths)}. Pass a sentence-transformers directory or source_dir=None.")
    return paths[0]


def _copy_sentence_transformers(source_dir: Path, out: Path) -> str:
    """Copy the sentence-transformers files (modules.json, pooling, normalize, dense, tokenizer, ...) of
    `source_dir` to `out`, leaving out the Transformer module's weights and config, which the export writes.
    Returns the Transformer module's folder."""
    transformer_dir = source_dir / _transformer_path(source_dir)

    def ignore(folder: str, entries: list[str]) -> set[str]:
        if Path(folder) == transformer_dir:
            return {e for e in entries if e in _REWRITTEN or e.startswith(".git")}
        return {e for e in entries if e.startswith(".git")}

    shutil.copytree(source_dir, out, ignore=ignore, dirs_exist_ok=True)
    return _transformer_path(source_dir)


def write_encoder_export(model: nn.Module, heads: Kept, ffn: Kept, out_dir: str | Path,
                         source_dir: str | Path | None = None, tokenizer=None, onnx: bool = True) -> dict:
    """Write the per-layer pruned `model` to `out_dir` (atomically) and return what was written.

    (a) The model's own class and config (`AutoModel` / `AutoModelForMaskedLM` / `AutoModelForCausalLM` reload it
        with stock transformers): see `padded_for_stock_config`.
    (b) With `source_dir` a sentence-transformers directory (has modules.json), its other files (pooling, normalize,
        tokenizer, configs) are copied so `SentenceTransformer(out_dir)` gives the pruned model's embeddings.
    (c) For BERT models, unless `onnx` is False, `onnx/model.onnx` beside the weights: the base encoder of
        `physically_pruned` (the real per-layer shapes), last_hidden_state out (see `export_onnx`), which
        `SentenceTransformer(out_dir, backend="onnx")` loads. None for decoders.
    `encoder_export.json` records the kept units per layer (query heads, KV heads, FFN neurons), the FFN width
    written, the parameter counts (physical: the padded tensors on disk; effective: the physically pruned model) and
    the ONNX exporter used.
    """
    out_dir = Path(out_dir)
    source = None if source_dir is None else Path(source_dir)
    if source is not None and not (source / "modules.json").is_file():
        raise ConfigError(f"source_dir={source} is not a sentence-transformers directory (no modules.json). Pass the "
                          "sentence-transformers folder the model came from, or source_dir=None and tokenizer=.")
    padded = padded_for_stock_config(model, heads, ffn)
    pruned = physically_pruned(model, heads, ffn)
    kept = _per_layer(model, heads, ffn)
    info = {
        "architecture": type(model).__name__,
        "ffn_width_written": getattr(padded.config, _family(model)["ffn_config"]),
        "kept_heads": [len(k.q) // _head_dim(model) for k in kept],
        "kept_kv_heads": [len(k.kv) // _head_dim(model) for k in kept],
        "kept_ffn": [len(k.ffn) for k in kept],
        "physical_params": count_params(padded),
        "effective_params": count_params(pruned),
        "sentence_transformers": source is not None,
        "onnx": None,
        "onnx_exporter": None,
    }

    def write(tmp: Path) -> None:
        model_dir = tmp / _copy_sentence_transformers(source, tmp) if source is not None else tmp
        padded.save_pretrained(model_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
        if onnx and model.config.model_type == "bert":
            onnx_path = model_dir / "onnx" / "model.onnx"
            info["onnx_exporter"] = export_onnx(pruned.base_model, onnx_path)
            info["onnx"] = str(onnx_path.relative_to(tmp))
        (tmp / "encoder_export.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        for path in tmp.rglob("*"):  # safetensors writes its files 0600; the export is meant to be shared
            if path.is_file():
                path.chmod(0o644)

    atomic_directory(out_dir, write)
    return info
