"""GradNAS plans: the per-layer search space, its costs from the cost model, and the plan that meets the budget.

Each layer chooses how many attention units and FFN neurons it keeps (hidden size and depth stay); a layer may keep
none of either. The attention unit is a head under multi-head attention (BERT, GPT-J) and a query group under
grouped-query attention (llama-like decoders): query head h reads KV head h // (heads / kv_heads), and the attention
forward repeats each KV head for a fixed number of query heads, so a layer keeps whole groups (a KV head with all of
its query heads); a group's score is the sum of its query heads' scores. The space is profiled against the
constraints before any gradient is computed (constraints.py); the search rules (gradnas_search.py, which call every
attention unit a head) then pick per-layer counts from the scores, and each layer keeps its top-scored units.
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
        head_step / neuron_step: choices move in these steps (plus the full width); head_step counts attention units
            (query groups under grouped-query attention).
    """

    cost: object
    dims: dict[str, int]
    seq_len: int = 128
    head_step: int = 1
    neuron_step: int = 1

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: the attention unit is a query group, not a head."""
        return self.dims["num_query_groups"] < self.dims["num_attention_heads"]

    @property
    def units(self) -> int:
        """Attention units per layer: KV heads (= query groups), one per query head without GQA."""
        return self.dims["num_query_groups"]

    @property
    def heads_per_unit(self) -> int:
        return self.dims["num_attention_heads"] // self.units

    @property
    def unit_name(self) -> str:
        return "groups" if self.grouped else "heads"

    @property
    def layers(self) -> int:
        return self.dims["num_layers"]

    def choices(self) -> dict[str, list[int]]:
        """Per layer, its attention unit and FFN neuron counts (ascending)."""
        def steps(full: int, step: int) -> list[int]:
            return sorted({*range(0, full, step), full})

        out = {}
        for i in range(self.layers):
            out[f"layer.{i}.{self.unit_name}"] = steps(self.units, self.head_step)
            out[f"layer.{i}.ffn"] = steps(self.dims["ffn_hidden_size"], self.neuron_step)
        return out

    def per_layer(self, units: list[int], neurons: list[int]) -> dict[int, dict[str, int]]:
        """Per-layer size overrides for the cost model: `units[i]` KV heads with their query heads, `neurons[i]`."""
        return {i: {"num_attention_heads": u * self.heads_per_unit, "num_query_groups": u, "ffn_hidden_size": n}
                for i, (u, n) in enumerate(zip(units, neurons, strict=True))}

    def costs(self, units: list[int], neurons: list[int]) -> dict[str, float]:
        sizes = self.per_layer(units, neurons)
        return {"params": self.cost.params(per_layer=sizes), "flops": self.cost.flops(self.seq_len, per_layer=sizes)}

    def choice_costs(self, choice: dict[str, int]) -> dict[str, float]:
        """Costs of one point of `choices()`."""
        n = range(self.layers)
        return self.costs([choice[f"layer.{i}.{self.unit_name}"] for i in n], [choice[f"layer.{i}.ffn"] for i in n])

    def full(self) -> dict[str, float]:
        return self.costs([self.units] * self.layers, [self.dims["ffn_hidden_size"]] * self.layers)

    def linear(self, key: str) -> LinearCost:
        """`key`'s cost as base + per attention unit + per neuron (exact: both are linear in the per-layer counts at
        a fixed hidden size; checked against the full model)."""
        zero = [0] * self.layers
        base = self.costs(zero, zero)[key]
        per_unit = self.costs([1] + zero[1:], zero)[key] - base
        per_neuron = self.costs(zero, [1] + zero[1:])[key] - base
        linear = LinearCost(base, per_unit, per_neuron)
        full = [self.units] * self.layers, [self.dims["ffn_hidden_size"]] * self.layers
        assert linear.of(*full) == self.costs(*full)[key], f"{key} is not linear in the per-layer counts"
        return linear

    def unit_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`scores` with each layer's head scores summed per attention unit, under the rules' names "heads.{i}".

        Query heads are head-major within their group (head h is in group h // heads_per_unit), so a group's heads
        are one row of the (units, heads_per_unit) view.
        """
        out = dict(scores)
        for i in range(self.layers):
            heads = scores[f"heads.{i}"]
            assert heads.numel() == self.dims["num_attention_heads"], (i, heads.shape, self.dims)
            out[f"heads.{i}"] = heads.view(self.units, self.heads_per_unit).sum(-1)  # (units,)
        return out

    def profile(self, raw_constraints: dict, prefix: str = "prune.constraints.") -> Profile:
        """The profile of this space against `prune.constraints` (absolute bounds parsed against the full model)."""
        bounds = parse_constraints(raw_constraints, self.full(), CONSTRAINTS, prefix)
        return profile(self.choices(), self.choice_costs, bounds, prefix)


def meet_budget(space: GradNASSpace, scores: dict[str, torch.Tensor], bounds: dict[str, float],
                rule: str) -> LayerWidths:
    """Per-layer counts within every bound, from scores per attention unit (`space.unit_scores`). One bound: the
    rule solves it exactly. Several: the rule runs on the first bound, scaled down by bisection until the result
    meets the others too (costs grow with every count)."""
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
    """The plan: per layer its top-scored attention units and neurons, counts chosen by `rule` within `bounds`.

    `plan.heads` holds each layer's kept query heads and `plan.groups` its kept KV heads (the heads themselves
    without GQA). `target` is what a stock config of the family can hold: every head slot (removed heads are
    zero-filled) and the widest layer's FFN width; `summary["gradnas"]` records the per-layer counts (query heads,
    and query groups under GQA) and the effective costs.
    """
    scores = space.unit_scores(scores)
    widths = meet_budget(space, scores, bounds, rule)
    kept = kept_units(scores, widths)
    n, per = space.layers, space.heads_per_unit
    groups = {i: kept[f"heads.{i}"].tolist() for i in range(n)}
    heads = {i: [g * per + j for g in groups[i] for j in range(per)] for i in range(n)}
    ffn = {i: kept[f"ffn.{i}"].tolist() for i in range(n)}
    dims = space.dims
    target = {**dims, "ffn_hidden_size": max(1, *map(len, ffn.values()))}
    costs = space.costs(widths.heads, widths.neurons)
    summary = {"gradnas": {"rule": rule, "bounds": bounds, "heads": [u * per for u in widths.heads],
                           "ffn": widths.neurons, "effective": costs, "full": space.full(), "seq_len": space.seq_len,
                           "kept_score": widths.importance,
                           "total_score": float(sum(s.sum() for s in scores.values()))}}
    if space.grouped:
        summary["gradnas"]["groups"] = widths.heads
    return PruningPlan(family, dims, target, list(range(n)), heads=heads, ffn=ffn, groups=groups, summary=summary)
