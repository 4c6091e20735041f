"""The pruning map: per model family, as data, which kept-index list slices which axis of every parameter.

An adapter declares a `PruningMap` of `Rule`s, one per parameter name pattern (`{i}` stands for the layer index).
A rule lists, per tensor axis, the index *space* that slices it: `"hidden"`, `"ffn"`, `"q"` (query heads x
head_dim, head-major), `"kv"` (KV heads x head_dim), `"m_inner"` (Mamba heads x head_dim, head-major),
`"m_heads"` (Mamba heads), or None (kept whole). A fused axis is a tuple of parts laid end to end, e.g. a Mamba
in_proj's rows `("m_inner", "m_inner", None, "m_heads")` = [z | x | B C | dt]; at most one part per axis is None
(kept whole) and its size is what the other parts leave of the axis.

The same declaration drives three things:
- `prune_tensor`: one tensor by name -> its pruned name (layers renumbered) and value, for live models, megatron
  layers gathered to Hugging Face names, and safetensors shards streamed one tensor at a time;
- `shapes_at`: the pruned shape of every parameter for any target, without a model (the cost model);
- `layer_of`: which tensors belong to which layer (streaming calibration loads one layer at a time).

Slicing is `index_select` along axis 0, then axis 1, ... (what module surgery did), so every backend and the
streaming path produce the same bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import torch

Part = str | None
Axis = Part | tuple[Part, ...]


@dataclass(frozen=True)
class Rule:
    """How one parameter name pattern is pruned.

    Attributes:
        pattern: the parameter name with `{i}` for the layer index, e.g. "model.layers.{i}.mlp.down_proj.weight".
        axes: per tensor axis, its index space (or a tuple of parts for a fused axis; None keeps the axis whole).
            Trailing axes that are not listed are kept whole (e.g. a conv kernel).
        scale: with `plan.rescale_norms`, the factor the kept values are multiplied by (`norm_factor`): "hidden"
            for RMSNorm weights over the hidden width, "final" for the final norm's, "gated" for Mamba's grouped
            gated norm, "residual" for every tensor that writes into the residual stream (the input embedding and
            the output projections of attention, MLP and Mamba mixers) and for the LM head.
        matmul: the weight of a linear layer (forward FLOPs: 2 per weight element per token); "first" for one that
            runs on the first token only (BERT's pooler).
        kind: "attention" or "ssm" on one parameter of every attention / Mamba mixer (the cost model counts
            attention scores, KV cache, the Mamba scan and its state once per layer that holds it).
    """

    pattern: str
    axes: tuple[Axis, ...]
    scale: str | None = None
    matmul: bool | str = False
    kind: str | None = None

    @cached_property
    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.pattern).replace(r"\{i\}", r"(\d+)") + r"\Z")


@dataclass(frozen=True)
class PruningMap:
    """Every rule of a family. `layers` is the layer name prefix pattern, e.g. "model.layers.{i}."."""

    rules: tuple[Rule, ...]
    layers: str
    tied: tuple[str, str] | None = field(default=None)  # (head, embedding) names that share one tensor when tied

    @cached_property
    def _matched(self) -> dict[str, tuple[Rule, int | None]]:
        return {}  # name -> rule_for(name): the cost model asks for every parameter of every search candidate

    def rule_for(self, name: str) -> tuple[Rule, int | None]:
        """The rule that matches `name` and the layer index it names (None outside the layers).

        Raises:
            KeyError: no rule matches (a parameter the adapter does not know: refuse rather than guess).
        """
        if name in self._matched:
            return self._matched[name]
        for rule in self.rules:
            m = rule.regex.match(name)
            if m:
                self._matched[name] = rule, int(m.group(1)) if m.groups() else None
                return self._matched[name]
        raise KeyError(f"no pruning rule for parameter '{name}'; the adapter's pruning map must list it")

    def layer_of(self, name: str) -> int | None:
        prefix = re.compile(re.escape(self.layers).replace(r"\{i\}", r"(\d+)"))
        m = prefix.match(name)
        return int(m.group(1)) if m else None

    def renamed(self, name: str, layer: int | None, kept_layers: list[int]) -> str | None:
        """`name` after depth pruning: its layer renumbered, or None when the layer is removed."""
        if layer is None:
            return name
        if layer not in kept_layers:
            return None
        old, new = self.layers.format(i=layer), self.layers.format(i=kept_layers.index(layer))
        return new + name[len(old):]

    def prune_tensor(self, name: str, tensor: torch.Tensor, plan) -> tuple[str, torch.Tensor] | None:
        """(new name, pruned tensor) of one parameter under `plan`, or None when its layer is removed."""
        rule, layer = self.rule_for(name)
        new_name = self.renamed(name, layer, plan.kept_layers)
        if new_name is None:
            return None
        spaces = kept_spaces(plan, layer)
        sizes = space_sizes(plan.original)
        for dim, axis in enumerate(rule.axes):
            index = axis_index(axis, tensor.shape[dim], spaces, sizes)
            if index is not None:
                tensor = tensor.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=tensor.device))
        factor = norm_factor(rule.scale, plan, spaces)
        if factor is not None:
            tensor = tensor.clone().mul_(factor)
        return new_name, tensor

    def shapes_at(self, shapes: dict[str, tuple[int, ...]], original: dict[str, int], target: dict[str, int],
                  kept_layers: list[int] | None = None,
                  per_layer: dict[int, dict[str, int]] | None = None) -> dict[str, tuple[int, ...]]:
        """Pruned shapes of the parameters `shapes` (name -> original shape) at sizes `target`, keeping
        `kept_layers` (original indices; default: the first target["num_layers"]). `per_layer` overrides sizes of
        single layers (original index -> e.g. {"ffn_hidden_size": 900, "num_attention_heads": 7}: GradNAS keeps
        its own width per layer). Names as they are now."""
        kept = list(range(target.get("num_layers", original["num_layers"]))) if kept_layers is None else kept_layers
        old, new = space_sizes(original), space_sizes({**original, **target})
        layer_sizes = {i: space_sizes({**original, **target, **sizes}) for i, sizes in (per_layer or {}).items()}
        out = {}
        for name, shape in shapes.items():
            rule, layer = self.rule_for(name)
            if layer is not None and layer not in kept:
                continue
            sizes = layer_sizes.get(layer, new)
            out[name] = tuple(axis_size(rule.axes[d] if d < len(rule.axes) else None, n, old, sizes)
                              for d, n in enumerate(shape))
        return out


def space_sizes(dims: dict[str, int]) -> dict[str, int]:
    """The size of every index space at these dims (only the spaces the family has)."""
    sizes = {"hidden": dims["hidden_size"]}
    if "ffn_hidden_size" in dims:
        sizes["ffn"] = dims["ffn_hidden_size"]
    if "num_attention_heads" in dims:
        sizes["q"] = dims["num_attention_heads"] * dims["head_dim"]
        sizes["kv"] = dims["num_query_groups"] * dims["head_dim"]
    if "mamba_num_heads" in dims:
        sizes["m_inner"] = dims["mamba_num_heads"] * dims["mamba_head_dim"]
        sizes["m_heads"] = dims["mamba_num_heads"]
    return sizes


def head_rows(units: list[int], size: int) -> list[int]:
    """Indices of a head-major layout ((units, size) flattened) that belong to the kept `units`."""
    return [u * size + j for u in units for j in range(size)]


def _layer_entry(table: dict | None, layer: int | None):
    return table.get(layer) if table and layer is not None else None


def kept_spaces(plan, layer: int | None) -> dict[str, list[int] | None]:
    """Kept indices of every index space for one layer (None: all kept)."""
    d = plan.original
    spaces: dict[str, list[int] | None] = {"hidden": plan.hidden}
    ffn = _layer_entry(plan.ffn, layer)
    spaces["ffn"] = ffn
    heads, groups = _layer_entry(plan.heads, layer), _layer_entry(plan.groups, layer)
    spaces["q"] = head_rows(heads, d["head_dim"]) if heads is not None else None
    spaces["kv"] = head_rows(groups, d["head_dim"]) if groups is not None else None
    m_heads, m_dims = _layer_entry(plan.mamba_heads, layer), _layer_entry(plan.mamba_head_dim, layer)
    if m_heads is None and m_dims is None:
        spaces["m_inner"] = spaces["m_heads"] = None
    else:
        m_heads = list(range(d["mamba_num_heads"])) if m_heads is None else m_heads
        m_dims = list(range(d["mamba_head_dim"])) if m_dims is None else m_dims
        spaces["m_inner"] = [h * d["mamba_head_dim"] + p for h in m_heads for p in m_dims]  # head-major
        spaces["m_heads"] = m_heads
    return spaces


def _parts(axis: Axis) -> tuple[Part, ...]:
    return axis if isinstance(axis, tuple) else (axis,)


def _fixed_size(parts: tuple[Part, ...], length: int, sizes: dict[str, int]) -> int:
    assert sum(p is None for p in parts) <= 1, f"at most one whole part per axis: {parts}"
    return length - sum(sizes[p] for p in parts if p is not None)


def axis_index(axis: Axis, length: int, spaces: dict, sizes: dict[str, int]) -> list[int] | None:
    """Kept positions along one axis of `length`, or None when nothing on it is pruned."""
    parts = _parts(axis)
    if all(p is None or spaces.get(p) is None for p in parts):
        return None
    index, offset = [], 0
    for part in parts:
        size = _fixed_size(parts, length, sizes) if part is None else sizes[part]
        kept = spaces.get(part) if part is not None else None
        index += [offset + k for k in kept] if kept is not None else list(range(offset, offset + size))
        offset += size
    assert offset == length, f"parts {parts} cover {offset} of an axis of {length}"
    return index


def axis_size(axis: Axis, length: int, old: dict[str, int], new: dict[str, int]) -> int:
    """An axis's length at the `new` sizes (its whole part keeps its old length)."""
    parts = _parts(axis)
    return sum(_fixed_size(parts, length, old) if p is None else new[p] for p in parts)


def width_ratios(plan) -> tuple[float, float]:
    """(r, g): the hidden width ratio d / d' and the Mamba gated norm's group width ratio n / n' (1 where unchanged)."""
    o, t = plan.original, plan.target
    r = o["hidden_size"] / len(plan.hidden) if plan.hidden is not None else 1.0
    g = 1.0
    if "mamba_num_heads" in o:
        g = o["mamba_num_heads"] * o["mamba_head_dim"] / (t["mamba_num_heads"] * t["mamba_head_dim"])
    return r, g


def eps_factor(plan) -> float:
    """The factor the config's norm epsilon is multiplied by under `plan.rescale_norms` (see `norm_factor`)."""
    return width_ratios(plan)[1] if plan.rescale_norms else 1.0


def residual_scale(plan) -> float:
    """The factor c the pruned model's residual stream is scaled by under `plan.rescale_norms` (see `norm_factor`):
    the pruned model's layer outputs are c times the original's (1 without rescaling)."""
    if not plan.rescale_norms:
        return 1.0
    r, g = width_ratios(plan)
    return (g / r) ** 0.5


def norm_factor(scale: str | None, plan, spaces: dict) -> float | None:
    """The factor a tensor is multiplied by under `plan.rescale_norms` (None: unchanged).

    An RMSNorm over width d computes w x / sqrt(sum(x^2) / d + eps). Removing channels makes it divide by d' < d; if
    the removed channels of x carried nothing (were zero), the pruned model computes exactly what the original did
    when, with r = d / d' (hidden) and g = n / n' (the Mamba gated norm's group width, 1 without Mamba pruning):
      - the config's epsilon (one for every norm of the model) becomes eps * g (`eps_factor`);
      - the residual stream is scaled by c = sqrt(g / r): the input embedding and every output projection that adds
        into it (o_proj, down_proj, Mamba's out_proj, weights and biases) are multiplied by c (`residual_scale`);
      - every hidden norm's weight by sqrt(r) (its input is c x, its epsilon eps * g: w sqrt(r) c x / sqrt(c^2 r
        sum(x^2) / d + eps g) = w x / sqrt(sum(x^2) / d + eps));
      - the final norm's weight by r / sqrt(g) = sqrt(r) / c, since the LM head is multiplied by c as well (so a
        tied head, which is the embedding, and an untied one are treated alike);
      - each Mamba gated norm's weight by sqrt(n / n') of its layer (its input is not on the residual stream).
    Norms whose width does not change (Qwen3's per-head q_norm / k_norm) keep both weight and epsilon: with g = 1 for
    every family without Mamba layers, they compute exactly what they did. So every norm is exact, in every family
    (tests/test_invariants.py, tests/test_mamba.py). Without rescaling the weights are plain slices: each norm then
    averages over its new width (for hidden norms, sum(x^2) / d' instead of / d).
    """
    if scale is None or not plan.rescale_norms:
        return None
    r, g = width_ratios(plan)
    if scale == "hidden":
        factor = r**0.5
    elif scale == "final":
        factor = r / g**0.5
    elif scale == "residual":
        factor = (g / r) ** 0.5
    else:  # "gated": this layer's group width ratio
        channels = spaces.get("m_inner")
        if channels is None:
            return None
        groups = plan.original["mamba_num_groups"]
        old_group = plan.original["mamba_num_heads"] * plan.original["mamba_head_dim"] // groups
        factor = (old_group / (len(channels) // groups)) ** 0.5
    return None if factor == 1.0 else factor
