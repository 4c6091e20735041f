"""Export a llama-like model (llama, mistral, qwen2, qwen3) as one GGUF file that llama.cpp runs as it is.

Written with the `gguf` package's GGUFWriter from the in-memory model and its tokenizer; no conversion script.
Pruning leaves head_dim != hidden / heads, so key/value length and the rotary dimension are written explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from llmprune.errors import ConfigError

log = logging.getLogger(__name__)

# model_type -> llama.cpp architecture. Mistral is llama's graph (sliding window off in the tiny/pruned models).
# qwen2 is written as llama too (whose graph takes optional q/k/v biases): llama.cpp's own qwen2 graph assumes
# heads x head_dim == hidden, which pruning breaks. qwen3 has per-head q/k RMSNorms and its own graph.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3"}
# llama.cpp's `llama` graph rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves (x_i, x_{i+hd/2}).
INTERLEAVED_ROPE = {"llama"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def check_gguf_family(model_type: str) -> None:
    """Fail before any work when llama.cpp has no graph for this family (called by validation and export)."""
    if model_type not in GGUF_ARCHITECTURES:
        raise ConfigError(f"export.formats contains gguf, but GGUF export covers the llama-like families "
                          f"({', '.join(GGUF_ARCHITECTURES)}); this is a '{model_type}' model. Remove gguf from "
                          "export.formats (export.formats=[hf]).")


def interleave_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    Row i and row i + hd/2 of a head form one rotated pair in transformers' rotate_half; llama.cpp's NORM rope
    rotates rows 2i and 2i+1, so the pairs are moved next to each other. Works on weights and biases."""
    head_dim = weight.shape[0] // n_heads
    assert n_heads * head_dim == weight.shape[0] and head_dim % 2 == 0, (weight.shape, n_heads)
    rest = weight.shape[1:]
    # (heads, 2, hd/2, ...) -> (heads, hd/2, 2, ...): the two halves' i-th rows become neighbours
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor, q/k rows permuted for the llama graph; a tied output is left to token_embd."""
    config = model.config
    arch = GGUF_ARCHITECTURES[config.model_type]
    tied = getattr(config, "tie_word_embeddings", False)
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if name in GLOBAL_NAMES:
            if not (tied and name == "lm_head.weight"):
                out[GLOBAL_NAMES[name]] = tensor
            continue
        match = _LAYER.fullmatch(name)
        if match is None or match.group(2) not in LAYER_NAMES:
            raise ConfigError(f"GGUF export does not know the tensor '{name}' of this {config.model_type} model; "
                              "remove gguf from export.formats.")
        layer, module, kind = match.groups()
        if arch in INTERLEAVED_ROPE and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            tensor = interleave_rotary(tensor, heads)
        out[f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"] = tensor
    return out


def _encode(tensor: torch.Tensor, gguf_type: str):
    """(array, raw ggml type or None) for one tensor; 1-D tensors (norms, biases) stay f32 as llama.cpp expects."""
    import gguf

    array = tensor.numpy()
    if array.ndim == 1 or gguf_type == "f32":
        return array, None
    if gguf_type == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if gguf_type == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None  # f16, and Q8_0 rows that are no whole number of 32-blocks


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer, config, tensors: dict[str, torch.Tensor]) -> dict:
    """The architecture keys; returns them for the report. FFN width is read per layer from the weights."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"GGUF export writes default or linear rotary scaling; this model uses rope_type="
                          f"'{rope_type}'. Remove gguf from export.formats.")
    ffn = [tensors[f"blk.{i}.ffn_up.weight"].shape[0] for i in range(config.num_hidden_layers)]
    hp = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
          "block_count": config.num_hidden_layers, "feed_forward_length": ffn[0] if len(set(ffn)) == 1 else ffn,
          "head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads,
          "key_length": _head_dim(config), "value_length": _head_dim(config),
          "rope_dimension_count": _head_dim(config), "rope_freq_base": float(rope.get("rope_theta", 10000.0)),
          "layer_norm_rms_eps": float(config.rms_norm_eps), "vocab_size": config.vocab_size}
    for key, value in hp.items():
        getattr(writer, f"add_{key}")(value)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    return hp


# pre-tokenizer regex features -> llama.cpp's pre-tokenizer name (llama-vocab.cpp); the split rule decides how
# text is cut before BPE, so a wrong name changes tokenization, never the model
_PRE_TOKENIZERS = ((r"\p{N}{1,3}", "llama-bpe"), (r"|\p{N}|", "qwen2"))


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: Llama-3 / Qwen2 regexes, SmolLM's digit split."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex", "") if step["type"] == "Split" else ""
        for feature, name in _PRE_TOKENIZERS:
            if feature in regex:
                return name
    if "Digits" in kinds and "ByteLevel" in kinds:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    log.warning("GGUF export: unrecognised pre-tokenizer %s; writing 'default'", kinds)
    return "default"


def check_gguf_exportable(model, tokenizer) -> None:
    """Fail before any file is written when the family or the tokenizer has no GGUF form written here."""
    check_gguf_family(model.config.model_type)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str())["model"] if backend is not None else {"type": type(tokenizer).__name__}
    if spec["type"] != "BPE" or spec.get("byte_fallback"):
        kind = "byte-fallback BPE (SentencePiece-style)" if spec["type"] == "BPE" else spec["type"]
        raise ConfigError(f"GGUF export writes byte-level BPE (gpt2-style) tokenizers; this tokenizer is {kind}. "
                          "Remove gguf from export.formats.")


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Tokens, types, merges, special ids, pre-tokenizer and chat template of a byte-level BPE tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings.")
    added = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size  # embedding rows the tokenizer never produces
    for text, i in vocab.items():
        tokens[i] = text
        special = added.get(i)
        types[i] = (gguf.TokenType.NORMAL if special is None else
                    gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                "unk": tokenizer.unk_token_id}
    for kind, token_id in specials.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return {"tokenizer_pre": pre, "merges": len(merges)}


def write_gguf(model, tokenizer, path: Path, gguf_type: str = "f16") -> dict:
    """Write `model` and `tokenizer` to `path` as GGUF (`gguf_type`: f32, f16, bf16 or q8_0); returns a summary.

    Raises:
        ConfigError: the family, rotary scaling or tokenizer has no llama.cpp equivalent written here.
    """
    import gguf

    config = model.config
    check_gguf_exportable(model, tokenizer)
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"export.gguf_type={gguf_type!r} is not one of: {', '.join(GGUF_TYPES)}.")
    arch = GGUF_ARCHITECTURES[config.model_type]
    tensors = gguf_tensors(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(getattr(config, "_name_or_path", "") or f"llmprune-{config.model_type}")
    hparams = _write_hparams(writer, config, tensors)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = _write_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in tensors.items():
        array, raw_dtype = _encode(tensor, gguf_type)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # a half-written file never carries the final name
    return {"path": str(path), "architecture": arch, "type": gguf_type, "bytes": path.stat().st_size,
            **hparams, **vocab}
