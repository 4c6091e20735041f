"""Apply a pruning plan to a live Hugging Face model: slice its tensors by the family's pruning map, rewrite a copy
of its config, rebuild the model from that config on the meta device and load the sliced tensors into it.

No module attribute is patched by hand: every size a module caches (intermediate_size, conv_dim, num_key_value_groups,
layer_idx, ...) comes from the rewritten config, exactly as when stock transformers loads the exported directory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmprune.plan import PruningPlan
from llmprune.pruning.map import eps_factor


def eps_scale(plan: PruningPlan) -> float:
    """The factor the config's norm epsilon is multiplied by (see map.norm_factor)."""
    return eps_factor(plan)


def pruned_config(adapter, plan: PruningPlan):
    """A copy of the model's config at the plan's shape."""
    config = copy.deepcopy(adapter.config)
    adapter.rewrite_config(config, plan.target, plan.kept_layers, eps_scale(plan))
    return config


@torch.no_grad()
def pruned_state(model: nn.Module, pmap, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """Every tensor of `model.state_dict()` pruned by `pmap` (removed layers left out, kept ones renumbered).
    Tensors that nothing slices are copied: the pruned model never shares storage with `model`."""
    out = {}
    for name, tensor in model.state_dict().items():
        pruned = pmap.prune_tensor(name, tensor, plan)
        if pruned is not None:
            out[pruned[0]] = pruned[1].clone() if pruned[1] is tensor else pruned[1]
    return out


@torch.no_grad()
def apply_plan(model: nn.Module, adapter, plan: PruningPlan) -> nn.Module:
    """A new model of the same class at the plan's shape holding the kept weights (`model` is left as it was).

    Non-persistent buffers (rotary frequencies) do not depend on the pruned sizes; they are copied from `model`.
    """
    pmap = adapter.pruning_map()
    state = pruned_state(model, pmap, plan)
    config = pruned_config(adapter, plan)
    with torch.device("meta"):
        new = type(model)._from_config(config, dtype=next(model.parameters()).dtype)
    new.load_state_dict(state, assign=True, strict=True)
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            old = old_buffers.get(_old_name(pmap, name, plan.kept_layers))
            assert old is not None and old.shape == buf.shape, f"no source for buffer {name}"
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner)._buffers[attr] = old.clone()
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    requires_grad = any(p.requires_grad for p in model.parameters())
    return new.requires_grad_(requires_grad).train(model.training)


def _old_name(pmap, name: str, kept_layers: list[int]) -> str:
    layer = pmap.layer_of(name)
    if layer is None:
        return name
    old, new = pmap.layers.format(i=kept_layers[layer]), pmap.layers.format(i=layer)
    return old + name[len(new):]
