"""GradNAS plans: the per-layer search space, its costs from the cost model, and the plan that meets the budget.

Each layer chooses how many attention heads and FFN neurons it keeps (hidden size and depth stay); a layer may keep
none of either. The space is profiled against the constraints before any gradient is computed (constraints.py); the
search rules (gradnas_search.py) then pick per-layer counts from the scores, and each layer keeps its top-scored
units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.plan.constraints import Profile, parse_constraints, profile
from llmprune.plan.gradnas_search import LayerWidths, LinearCost, gradnas_widths, kept_units
from llmprune.plan.plan import PruningPlan

CONSTRAINTS = ("params", "flops")


@dataclass
class GradNASSpace:
    """The per-layer choices of one model and their costs.

    Attributes:
        cost: the adapter's CostModel.
        dims: the model's sizes (adapter.dims()).
        seq_len: the sequence length FLOPs are counted at (FLOPs per sequence; attention is quadratic in it).
        head_step / neuron_step: choices move in these steps (plus the full width).
        kv_with_heads: removing a query head removes its key / value too (multi-head attention: BERT, GPT-J); with
            grouped-query attention (llama) only query heads are chosen and the KV heads stay.
    """

    cost: object
    dims: dict[str, int]
    seq_len: int = 128
    head_step: int = 1
    neuron_step: int = 1

    @property
    def kv_with_heads(self) -> bool:
        return self.dims["num_query_groups"] == self.dims["num_attention_heads"]

    @property
    def layers(self) -> int:
        return self.dims["num_layers"]

    def choices(self) -> dict[str, list[int]]:
        """Per layer, its head and FFN neuron counts (ascending)."""
        def steps(full: int, step: int) -> list[int]:
            return sorted({*range(0, full, step), full})

        out = {}
        for i in range(self.layers):
            out[f"layer.{i}.heads"] = steps(self.dims["num_attention_heads"], self.head_step)
            out[f"layer.{i}.ffn"] = steps(self.dims["ffn_hidden_size"], self.neuron_step)
        return out

    def per_layer(self, heads: list[int], neurons: list[int]) -> dict[int, dict[str, int]]:
        """Per-layer size overrides for the cost model."""
        out = {}
        for i, (h, n) in enumerate(zip(heads, neurons, strict=True)):
            out[i] = {"num_attention_heads": h, "ffn_hidden_size": n}
            if self.kv_with_heads:
                out[i]["num_query_groups"] = h
        return out

    def costs(self, heads: list[int], neurons: list[int]) -> dict[str, float]:
        sizes = self.per_layer(heads, neurons)
        return {"params": self.cost.params(per_layer=sizes), "flops": self.cost.flops(self.seq_len, per_layer=sizes)}

    def choice_costs(self, choice: dict[str, int]) -> dict[str, float]:
        """Costs of one point of `choices()`."""
        n = range(self.layers)
        return self.costs([choice[f"layer.{i}.heads"] for i in n], [choice[f"layer.{i}.ffn"] for i in n])

    def full(self) -> dict[str, float]:
        heads, ffn = self.dims["num_attention_heads"], self.dims["ffn_hidden_size"]
        return self.costs([heads] * self.layers, [ffn] * self.layers)

    def linear(self, key: str) -> LinearCost:
        """`key`'s cost as base + per head + per neuron (exact: both are linear in the per-layer counts at a fixed
        hidden size; checked against the full model)."""
        zero = [0] * self.layers
        base = self.costs(zero, zero)[key]
        per_head = self.costs([1] + zero[1:], zero)[key] - base
        per_neuron = self.costs(zero, [1] + zero[1:])[key] - base
        linear = LinearCost(base, per_head, per_neuron)
        full = [self.dims["num_attention_heads"]] * self.layers, [self.dims["ffn_hidden_size"]] * self.layers
        assert linear.of(*full) == self.costs(*full)[key], f"{key} is not linear in the per-layer counts"
        return linear

    def profile(self, raw_constraints: dict, prefix: str = "prune.constraints.") -> Profile:
        """The profile of this space against `prune.constraints` (absolute bounds parsed against the full model)."""
        bounds = parse_constraints(raw_constraints, self.full(), CONSTRAINTS, prefix)
        return profile(self.choices(), self.choice_costs, bounds, prefix)


def meet_budget(space: GradNASSpace, scores: dict[str, torch.Tensor], bounds: dict[str, float],
                rule: str) -> LayerWidths:
    """Per-layer counts within every bound. One bound: the rule solves it exactly. Several: the rule runs on the
    first bound, scaled down by bisection until the result meets the others too (costs grow with every count)."""
    keys = list(bounds)
    primary, linear = keys[0], space.linear(keys[0])

    def solve(budget: float) -> LayerWidths:
        return gradnas_widths(rule, scores, linear, budget, space.head_step, space.neuron_step)

    def fits(widths: LayerWidths) -> bool:
        costs = space.costs(widths.heads, widths.neurons)
        return all(costs[k] <= bounds[k] for k in keys)

    widths = solve(bounds[primary])
    if fits(widths):
        return widths
    lo, hi = linear.base, bounds[primary]  # solve(lo) keeps nothing, which the profile showed fits every bound
    for _ in range(60):
        mid = (lo + hi) / 2
        if fits(solve(mid)):
            lo = mid
        else:
            hi = mid
    return solve(lo)


def gradnas_plan(family: str, space: GradNASSpace, scores: dict[str, torch.Tensor], bounds: dict[str, float],
                 rule: str) -> PruningPlan:
    """The plan: per layer its top-scored heads and neurons, counts chosen by `rule` within `bounds`.

    `target` is what a stock config of the family can hold: every head slot (removed heads are zero-filled) and the
    widest layer's FFN width; `summary["gradnas"]` records the per-layer counts and the effective costs.
    """
    widths = meet_budget(space, scores, bounds, rule)
    kept = kept_units(scores, widths)
    n = space.layers
    heads = {i: kept[f"heads.{i}"].tolist() for i in range(n)}
    ffn = {i: kept[f"ffn.{i}"].tolist() for i in range(n)}
    dims = space.dims
    target = {**dims, "ffn_hidden_size": max(1, *map(len, ffn.values()))}
    costs = space.costs(widths.heads, widths.neurons)
    summary = {"gradnas": {"rule": rule, "bounds": bounds, "heads": widths.heads, "ffn": widths.neurons,
                           "effective": costs, "full": space.full(), "seq_len": space.seq_len,
                           "kept_score": widths.importance,
                           "total_score": float(sum(s.sum() for s in scores.values()))}}
    return PruningPlan(family, dims, target, list(range(n)), heads=heads, ffn=ffn,
                       groups=heads if space.kv_with_heads else None, summary=summary)
