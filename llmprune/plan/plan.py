"""The pruning plan: target sizes and the indices each dimension keeps, derived from named scores.

Backend independent: it reads score vectors by name (see `importance.py`) and the model's sizes, never a
module. `plan.json` is this dataclass as JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import torch

from llmprune.errors import ConfigError

TARGET_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers",
               "mamba_num_heads", "mamba_head_dim")
DEPTH_METHODS = ("drop_one", "block_importance", "contiguous")


class PlanError(ConfigError):
    """Targets that cannot be built from this model."""


@dataclass
class PruningPlan:
    """What to keep. Layer-keyed fields use the original layer index.

    Attributes:
        family: the adapter family that made the plan.
        original / target: sizes by ModelOpt name (plus head_dim, vocab_size).
        kept_layers: original indices of the layers that stay, in order.
        hidden: kept embedding channels, or None when the hidden size is unchanged.
        ffn / heads / groups: per kept layer that has them, kept FFN neurons, query heads and KV heads (None = all).
        mamba_heads / mamba_head_dim: per kept Mamba layer, kept Mamba heads (the same number in every n_groups
            group) and kept head-dim channels (one set shared by all heads of the layer); None = all.
        rescale_norms: compensate the norms for the width change exactly (see pruning/map.py, norm_factor).
        depth: how the layers were chosen and the removed layers' scores.
        summary: per dimension, how much of the importance mass the kept units carry.
    """

    family: str
    original: dict[str, int]
    target: dict[str, int]
    kept_layers: list[int]
    hidden: list[int] | None = None
    ffn: dict[int, list[int]] | None = None
    heads: dict[int, list[int]] | None = None
    groups: dict[int, list[int]] | None = None
    mamba_heads: dict[int, list[int]] | None = None
    mamba_head_dim: dict[int, list[int]] | None = None
    rescale_norms: bool = False
    depth: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return all(self.original[k] == self.target[k] for k in TARGET_KEYS if k in self.original)

    def to_json(self) -> str:
        """Indented JSON with every index list on one line (readable, and small for big models)."""
        text = json.dumps(asdict(self), indent=1)
        return re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)

    def fingerprint(self) -> str:
        """Identifies what the plan keeps (not its summary), for resume checks."""
        data = {k: v for k, v in asdict(self).items() if k != "summary"}
        # the removed layers' scores are informational floats whose last digits depend on how calibration was
        # sharded (torchrun), not part of what is kept
        data["depth"] = {k: v for k, v in data["depth"].items() if k != "removed_scores"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        data = json.loads(text)
        for key in ("ffn", "heads", "groups", "mamba_heads", "mamba_head_dim"):
            if data.get(key) is not None:
                data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)


def resolve_targets(dims: dict[str, int], targets: dict, prefix: str = "prune.export_config.",
                    family: str | None = None) -> dict[str, int]:
    """Fill unset targets from the model's sizes and check them; raise one PlanError listing every problem.

    `dims` holds only the dimensions the model's family can prune (a Mamba2 model has no ffn_hidden_size), so a
    target for any other key is an error that names the key and the family.
    """
    problems = []
    supported = [k for k in TARGET_KEYS if k in dims]
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown:
        problems.append(f"unknown target {', '.join(prefix + k for k in unknown)}. Known: {', '.join(supported)}.")
    out = dict(dims)
    for key in TARGET_KEYS:
        value = targets.get(key)
        if value is None:
            continue
        if key not in dims:
            owner = f"the {family} family" if family else "this model"
            problems.append(f"{prefix}{key}={value!r}: {owner} has no such dimension; it can prune "
                            f"{', '.join(supported)}. Remove the key or set it to null.")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{prefix}{key}={value!r} must be a positive integer.")
        elif value > dims[key]:
            problems.append(f"{prefix}{key}={value} is larger than the model's {dims[key]}; "
                            f"choose at most {dims[key]}.")
        else:
            out[key] = value
    if "num_attention_heads" in dims:
        heads, groups = dims["num_attention_heads"], dims["num_query_groups"]
        per_group = heads // groups
        if targets.get("num_query_groups") is not None and targets.get("num_attention_heads") is None:
            out["num_attention_heads"] = out["num_query_groups"] * per_group  # removing a group removes its heads
        if not problems:
            if out["num_attention_heads"] % out["num_query_groups"]:
                problems.append(
                    f"{prefix}num_attention_heads={out['num_attention_heads']} is not a multiple of num_query_groups="
                    f"{out['num_query_groups']}; every KV group keeps the same number of query heads.")
            elif out["num_attention_heads"] // out["num_query_groups"] > per_group:
                problems.append(
                    f"{prefix}num_attention_heads={out['num_attention_heads']} with num_query_groups="
                    f"{out['num_query_groups']} needs {out['num_attention_heads'] // out['num_query_groups']} heads "
                    f"per group but the model has {per_group}; raise num_query_groups or lower num_attention_heads.")
    if "mamba_num_heads" in dims and not problems:
        mamba_groups = dims["mamba_num_groups"]  # B / C groups (config n_groups); they are never pruned
        if out["mamba_num_heads"] % mamba_groups:
            problems.append(
                f"{prefix}mamba_num_heads={out['mamba_num_heads']} is not a multiple of the model's Mamba n_groups="
                f"{mamba_groups}; every group keeps the same number of heads, so choose a multiple of {mamba_groups}.")
    if problems:
        raise PlanError("Invalid pruning targets:\n  - " + "\n  - ".join(problems))
    return out


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (keeps the original layout)."""
    return sorted(torch.topk(scores.float(), k).indices.tolist())


def _mass_kept(scores: torch.Tensor, kept: list[int]) -> float:
    total = float(scores.sum())
    return float(scores[kept].sum()) / total if total > 0 else 1.0


def depth_score_name(method: str, metric: str, num_drop: int) -> str:
    """The name of the score vector a depth method ranks layers by."""
    if method == "block_importance":
        return "block_importance"
    if method == "drop_one":
        return f"depth.drop_one.{metric}"
    return f"depth.contiguous.{metric}.n{num_drop}"


def with_drop_layers(targets: dict, drop_layers: list[int] | None, num_layers: int,
                     prefix: str = "prune.") -> dict:
    """`targets` with num_layers following prune.depth.drop_layers (checked against the model's layer count)."""
    if not drop_layers:
        return targets
    bad = sorted({i for i in drop_layers if not 0 <= i < num_layers})
    if bad or len(set(drop_layers)) != len(drop_layers) or len(drop_layers) >= num_layers:
        raise PlanError(f"{prefix}depth.drop_layers={list(drop_layers)} must name distinct layers in 0 .. "
                        f"{num_layers - 1} and keep at least one" + (f" ({bad} are out of range)" if bad else "") + ".")
    keep = num_layers - len(drop_layers)
    if targets.get("num_layers") not in (None, keep):
        raise PlanError(f"{prefix}export_config.num_layers={targets['num_layers']} but {prefix}depth.drop_layers "
                        f"removes {len(drop_layers)} of {num_layers} layers ({keep} stay); leave num_layers unset.")
    return {**targets, "num_layers": keep}


def choose_layers(scores: dict[str, torch.Tensor], num_layers: int, keep: int, method: str, metric: str,
                  drop_layers: list[int] | None = None) -> dict:
    """Pick the layers to keep (exactly `drop_layers` removed when given). Returns {kept, removed, method, metric,
    score_name, removed_scores}."""
    if drop_layers:
        removed = sorted(drop_layers)
        return {"kept": [i for i in range(num_layers) if i not in removed], "removed": removed,
                "method": "drop_layers", "metric": None}
    drop = num_layers - keep
    name = depth_score_name(method, metric, drop)
    if drop == 0:
        return {"kept": list(range(num_layers)), "removed": [], "method": method, "metric": metric}
    if name not in scores:
        raise PlanError(f"depth method {method!r} needs the score '{name}', which calibration did not compute; "
                        "re-run calibration with the same prune.depth settings.")
    score = scores[name].float()
    if method == "contiguous":
        start = int(torch.argmin(score))
        removed = list(range(start, start + drop))
        removed_scores = [float(score[start])]
    elif method == "block_importance":
        removed = sorted(torch.topk(score, drop, largest=False).indices.tolist())  # most similar in/out
        removed_scores = [float(score[i]) for i in removed]
    else:  # drop_one: removing these layers alone raised the loss least
        removed = sorted(torch.topk(score, drop, largest=False).indices.tolist())
        removed_scores = [float(score[i]) for i in removed]
    kept = [i for i in range(num_layers) if i not in removed]
    return {"kept": kept, "removed": removed, "method": method, "metric": metric, "score_name": name,
            "removed_scores": removed_scores}


def _check_attention_kept(layer_types: list[str], kept_layers: list[int], depth: dict) -> None:
    """A hybrid keeps at least one attention layer: without one, stock transformers' cache fails on generate()
    ("get_seq_length can only be called on Attention layers"), though a forward without a cache still runs."""
    attention = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if attention and not any(i in kept_layers for i in attention):
        raise PlanError(f"depth pruning ({depth['method']}) removes every attention layer of this hybrid (layers "
                        f"{attention}); stock transformers cannot generate with its cache without one. Keep more "
                        "layers (raise prune.export_config.num_layers) or choose another prune.depth.method.")


def _scored_layers(scores: dict[str, torch.Tensor], name: str, kept_layers: list[int], num_layers: int) -> list[int]:
    """The kept layers that have a `{name}.{i}` score: a hybrid scores FFN neurons only on its MLP layers, heads
    only on its attention layers. Raises PlanError when no layer at all has one (calibration did not score it)."""
    if not any(f"{name}.{i}" in scores for i in range(num_layers)):
        raise PlanError(f"the targets prune '{name}' units but the scores hold no '{name}.<layer>' vector; re-run "
                        "calibration for this model (importance.safetensors may come from another model).")
    return [i for i in kept_layers if f"{name}.{i}" in scores]


def _mean_mass(scores: dict[str, torch.Tensor], name: str, kept: dict[int, list[int]]) -> float | None:
    if not kept:
        return None
    return sum(_mass_kept(scores[f"{name}.{i}"], units) for i, units in kept.items()) / len(kept)


def make_plan(family: str, scores: dict[str, torch.Tensor], dims: dict[str, int], targets: dict,
              depth_method: str = "drop_one", depth_metric: str = "lm_loss",
              rescale_norms: bool = False, layer_types: list[str] | None = None,
              drop_layers: list[int] | None = None) -> PruningPlan:
    """Turn importance scores and targets into a PruningPlan (Minitron: rank, keep the top units).

    Args:
        family: adapter family, recorded in the plan.
        scores: named score vectors from `importance.calibrate` (or a baseline scorer).
        dims: the model's sizes (`adapter.dims(model)`); only the dimensions its family can prune.
        targets: subset of TARGET_KEYS.
        depth_method / depth_metric: how to choose layers when num_layers shrinks.
        rescale_norms: see PruneConfig.rescale_norms.
        layer_types: each layer's type (hybrids, `adapter.layer_types`); recorded for the removed layers as
            depth["removed_types"].
        drop_layers: remove exactly these layers (prune.depth.drop_layers) instead of choosing them by scores.
    """
    num_layers = dims["num_layers"]
    targets = with_drop_layers({k: v for k, v in targets.items() if v is not None}, drop_layers, num_layers)
    target = resolve_targets(dims, targets, family=family)
    depth = choose_layers(scores, num_layers, target["num_layers"], depth_method, depth_metric, drop_layers)
    kept_layers = depth.pop("kept")
    if layer_types is not None:
        depth["removed_types"] = [layer_types[i] for i in depth["removed"]]
        _check_attention_kept(layer_types, kept_layers, depth)
    plan = PruningPlan(family=family, original=dict(dims), target=target, kept_layers=kept_layers,
                       rescale_norms=rescale_norms, depth=depth)
    summary: dict[str, float | None] = {}
    if target["hidden_size"] < dims["hidden_size"]:
        plan.hidden = _topk_sorted(scores["hidden"], target["hidden_size"])
        summary["hidden"] = _mass_kept(scores["hidden"], plan.hidden)
    if "ffn_hidden_size" in dims and target["ffn_hidden_size"] < dims["ffn_hidden_size"]:
        plan.ffn = {i: _topk_sorted(scores[f"ffn.{i}"], target["ffn_hidden_size"])
                    for i in _scored_layers(scores, "ffn", kept_layers, num_layers)}
        summary["ffn"] = _mean_mass(scores, "ffn", plan.ffn)
    if "num_attention_heads" in dims:
        heads, groups = dims["num_attention_heads"], dims["num_query_groups"]
        if (target["num_attention_heads"], target["num_query_groups"]) != (heads, groups):
            plan.heads, plan.groups = {}, {}
            for i in _scored_layers(scores, "heads", kept_layers, num_layers):
                plan.groups[i], plan.heads[i] = choose_heads(scores[f"heads.{i}"], groups,
                                                             target["num_query_groups"], target["num_attention_heads"])
            summary["heads"] = _mean_mass(scores, "heads", plan.heads)
    if "mamba_num_heads" in dims and target["mamba_num_heads"] < dims["mamba_num_heads"]:
        # Mamba heads are ranked inside their B/C group (head h uses group h // (heads / n_groups)); every group
        # keeps the same number and no group is removed, so this is choose_heads with all groups kept.
        mamba_groups = dims["mamba_num_groups"]
        plan.mamba_heads = {
            i: choose_heads(scores[f"mamba_heads.{i}"], mamba_groups, mamba_groups, target["mamba_num_heads"])[1]
            for i in _scored_layers(scores, "mamba_heads", kept_layers, num_layers)}
        summary["mamba_heads"] = _mean_mass(scores, "mamba_heads", plan.mamba_heads)
    if "mamba_head_dim" in dims and target["mamba_head_dim"] < dims["mamba_head_dim"]:
        plan.mamba_head_dim = {i: _topk_sorted(scores[f"mamba_head_dim.{i}"], target["mamba_head_dim"])
                               for i in _scored_layers(scores, "mamba_head_dim", kept_layers, num_layers)}
        summary["mamba_head_dim"] = _mean_mass(scores, "mamba_head_dim", plan.mamba_head_dim)
    plan.summary = {f"{k}_score_mass_kept": round(v, 4) for k, v in summary.items() if v is not None}
    return plan


def choose_heads(head_scores: torch.Tensor, groups: int, keep_groups: int, keep_heads: int) -> tuple[list, list]:
    """GQA-aware head selection for one layer.

    Query head h belongs to KV group h // (heads / groups) (the layout of transformers' repeat_kv and of
    Megatron's query groups). A group's score is the L2 norm of its heads' scores; the best `keep_groups`
    groups stay, and inside each the best keep_heads / keep_groups heads, so every group keeps the same count.

    Returns:
        (kept KV group indices, kept query head indices), both ascending.
    """
    per_group = head_scores.numel() // groups
    by_group = head_scores.float().view(groups, per_group)  # (G, heads per group)
    kept_groups = _topk_sorted(by_group.norm(dim=1), keep_groups)
    per_kept = keep_heads // keep_groups
    kept_heads = []
    for g in kept_groups:
        kept_heads += [g * per_group + j for j in _topk_sorted(by_group[g], per_kept)]
    return kept_groups, kept_heads
