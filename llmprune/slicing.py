"""Shape surgery on torch modules: keep a subset of rows / columns and return a new module.

These helpers know tensors, not model families; adapters decide which indices each weight keeps.
"""

from __future__ import annotations

import torch
from torch import nn


def _index(idx: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.long, device=device)


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_idx=None, in_idx=None) -> nn.Linear:
    """A new Linear keeping output rows `out_idx` and input columns `in_idx` (None keeps all)."""
    if out_idx is None and in_idx is None:
        return linear
    weight = linear.weight
    if out_idx is not None:
        weight = weight.index_select(0, _index(out_idx, weight.device))
    if in_idx is not None:
        weight = weight.index_select(1, _index(in_idx, weight.device))
    bias = linear.bias
    if bias is not None and out_idx is not None:
        bias = bias.index_select(0, _index(out_idx, bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


@torch.no_grad()
def slice_embedding(embedding: nn.Embedding, dim_idx) -> nn.Embedding:
    """A new Embedding keeping embedding channels `dim_idx` (all rows of the vocabulary)."""
    weight = embedding.weight.index_select(1, _index(dim_idx, embedding.weight.device))
    new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=embedding.padding_idx, device="meta",
                       dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=embedding.weight.requires_grad)
    return new


@torch.no_grad()
def slice_parameter(param: nn.Parameter, idx, dim: int = 0) -> nn.Parameter:
    """A new Parameter keeping `idx` along `dim`."""
    return nn.Parameter(param.index_select(dim, _index(idx, param.device)).clone(), requires_grad=param.requires_grad)


@torch.no_grad()
def slice_rmsnorm(norm: nn.Module, idx, rescale_from: int | None = None) -> None:
    """Keep channels `idx` of an RMSNorm-like module (a `weight` and a `variance_epsilon` or `eps`) in place.

    With `rescale_from=d` (the width before pruning), the weight is multiplied by sqrt(d / d') and the epsilon
    by d / d'. Then RMS(x') = sqrt(d / d') * RMS(x) exactly whenever the removed channels of x are zero, so the
    normalized output is unchanged (mean(x^2) divides by the width, which pruning changes).
    """
    norm.weight = slice_parameter(norm.weight, idx)
    if rescale_from is not None:
        ratio = rescale_from / len(idx)
        norm.weight.mul_(ratio**0.5)
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(norm, attr, None), float):
                setattr(norm, attr, getattr(norm, attr) * ratio)


def head_rows(units: list[int], size: int) -> list[int]:
    """Indices of a head-major layout ((units, size) flattened) that belong to the kept `units`."""
    return [u * size + j for u in units for j in range(size)]


@torch.no_grad()
def slice_gqa_attention(attn: nn.Module, heads, groups, head_dim: int, hidden, heads_per_group: int) -> None:
    """Keep query heads `heads`, KV heads `groups` and hidden channels `hidden` (None keeps all) of an attention
    module with head-major q/k/v/o_proj (transformers' layout), in place."""
    q_rows = head_rows(heads, head_dim) if heads is not None else None
    kv_rows = head_rows(groups, head_dim) if groups is not None else None
    attn.q_proj = slice_linear(attn.q_proj, q_rows, hidden)
    attn.k_proj = slice_linear(attn.k_proj, kv_rows, hidden)
    attn.v_proj = slice_linear(attn.v_proj, kv_rows, hidden)
    attn.o_proj = slice_linear(attn.o_proj, hidden, q_rows)
    attn.num_key_value_groups = heads_per_group


@torch.no_grad()
def slice_depthwise_conv1d(conv: nn.Conv1d, idx) -> nn.Conv1d:
    """A new depthwise Conv1d (groups == channels) keeping channels `idx`; each channel owns its own filter."""
    assert conv.groups == conv.in_channels == conv.out_channels, (conv.groups, conv.in_channels, conv.out_channels)
    weight = conv.weight.index_select(0, _index(idx, conv.weight.device))  # (C', 1, K)
    channels = weight.shape[0]
    new = nn.Conv1d(channels, channels, conv.kernel_size[0], groups=channels, padding=conv.padding,
                    bias=conv.bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        new.bias = slice_parameter(conv.bias, idx)
    return new


@torch.no_grad()
def slice_vocab_ends(model: nn.Module, final_norm: nn.Module, hidden, rescale_from: int | None = None) -> None:
    """Input embeddings, the final norm and the LM head (tied or not) keep hidden channels `hidden`, in place.

    Uses the Hugging Face accessors (get/set_input_embeddings, get/set_output_embeddings), so it serves every family.
    """
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    model.set_input_embeddings(slice_embedding(embed, hidden))
    slice_rmsnorm(final_norm, hidden, rescale_from)
    if tied:
        new_head = nn.Linear(len(hidden), head.out_features, bias=False, device="meta")
        new_head.weight = model.get_input_embeddings().weight
    else:
        new_head = slice_linear(head, None, hidden)
    model.set_output_embeddings(new_head)
