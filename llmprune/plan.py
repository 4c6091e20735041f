"""The pruning plan: target sizes and the indices each dimension keeps, derived from named scores.

Backend independent: it reads score vectors by name (see `importance.py`) and the model's sizes, never a
module. `plan.json` is this dataclass as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch

from llmprune.config import ConfigError

TARGET_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")
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
        ffn / heads / groups: per kept layer, kept FFN neurons, query heads and KV heads (None = all).
        rescale_norms: rescale RMSNorm weight and epsilon for the hidden width change (see slicing.py).
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
    rescale_norms: bool = False
    depth: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return all(self.original[k] == self.target[k] for k in TARGET_KEYS)

    def to_json(self) -> str:
        """Indented JSON with every index list on one line (readable, and small for big models)."""
        text = json.dumps(asdict(self), indent=1)
        return re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        data = json.loads(text)
        for key in ("ffn", "heads", "groups"):
            if data.get(key) is not None:
                data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)


def resolve_targets(dims: dict[str, int], targets: dict, prefix: str = "prune.export_config.") -> dict[str, int]:
    """Fill unset targets from the model's sizes and check them; raise one PlanError listing every problem."""
    problems = []
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown:
        problems.append(f"unknown target {', '.join(prefix + k for k in unknown)}. Known: {', '.join(TARGET_KEYS)}.")
    out = dict(dims)
    for key in TARGET_KEYS:
        value = targets.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{prefix}{key}={value!r} must be a positive integer.")
        elif value > dims[key]:
            problems.append(f"{prefix}{key}={value} is larger than the model's {dims[key]}; "
                            f"choose at most {dims[key]}.")
        else:
            out[key] = value
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
                f"{out['num_query_groups']} needs {out['num_attention_heads'] // out['num_query_groups']} heads per "
                f"group but the model has {per_group}; raise num_query_groups or lower num_attention_heads.")
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


def choose_layers(scores: dict[str, torch.Tensor], num_layers: int, keep: int, method: str, metric: str) -> dict:
    """Pick the layers to keep. Returns {kept, removed, method, metric, score_name, removed_scores}."""
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


def make_plan(family: str, scores: dict[str, torch.Tensor], dims: dict[str, int], targets: dict,
              depth_method: str = "drop_one", depth_metric: str = "lm_loss",
              rescale_norms: bool = False) -> PruningPlan:
    """Turn importance scores and targets into a PruningPlan (Minitron: rank, keep the top units).

    Args:
        family: adapter family, recorded in the plan.
        scores: named score vectors from `importance.calibrate` (or a baseline scorer).
        dims: the model's sizes (`adapter.dims(model)`).
        targets: subset of TARGET_KEYS.
        depth_method / depth_metric: how to choose layers when num_layers shrinks.
        rescale_norms: see PruneConfig.rescale_norms.
    """
    target = resolve_targets(dims, {k: v for k, v in targets.items() if v is not None})
    depth = choose_layers(scores, dims["num_layers"], target["num_layers"], depth_method, depth_metric)
    kept_layers = depth.pop("kept")
    plan = PruningPlan(family=family, original=dict(dims), target=target, kept_layers=kept_layers,
                       rescale_norms=rescale_norms, depth=depth)
    summary: dict[str, float] = {}
    if target["hidden_size"] < dims["hidden_size"]:
        plan.hidden = _topk_sorted(scores["hidden"], target["hidden_size"])
        summary["hidden"] = _mass_kept(scores["hidden"], plan.hidden)
    if target["ffn_hidden_size"] < dims["ffn_hidden_size"]:
        plan.ffn = {i: _topk_sorted(scores[f"ffn.{i}"], target["ffn_hidden_size"]) for i in kept_layers}
        summary["ffn"] = sum(_mass_kept(scores[f"ffn.{i}"], plan.ffn[i]) for i in kept_layers) / len(kept_layers)
    heads, groups = dims["num_attention_heads"], dims["num_query_groups"]
    if (target["num_attention_heads"], target["num_query_groups"]) != (heads, groups):
        plan.heads, plan.groups = {}, {}
        for i in kept_layers:
            plan.groups[i], plan.heads[i] = choose_heads(scores[f"heads.{i}"], groups, target["num_query_groups"],
                                                         target["num_attention_heads"])
        summary["heads"] = sum(_mass_kept(scores[f"heads.{i}"], plan.heads[i]) for i in kept_layers) / len(kept_layers)
    plan.summary = {f"{k}_score_mass_kept": round(v, 4) for k, v in summary.items()}
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
