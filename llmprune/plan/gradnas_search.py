"""Per-layer head and neuron counts that meet a budget from GradNAS scores, by two rules.

The hidden size and layer count stay, so cost is linear in the per-layer kept counts (`LinearCost`). Each layer
keeps its top-scored units; a layer may keep 0 heads or 0 neurons (as in Kwon et al. 2022), and its neuron count
moves in steps of `neuron_step` (plus the full width when that is not a multiple). Both rules return a result whose
cost is within the budget and raise a ValueError naming the achievable range when nothing fits.

- threshold (ModelOpt's GradNAS): one global sensitivity threshold t. Each layer's heads and its neurons keep their
  smallest choice whose pruned score mass (the removed lowest-scored units' scores over that layer-dim's total) is
  at most t; t is bisected to the smallest value whose cost fits. Ties at t are broken in layer order, so the
  result is one step of one layer-dim away from over budget.
- knapsack (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers", section 4.2): for every
  count h of globally most important heads, the remaining budget fixes the count n of globally most important
  neurons that fit; the (h, n) pair with the largest kept score wins. With steps of 1 this is the exact optimum:
  cost depends only on the totals, and for given totals the global top units carry the most score.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearCost:
    """cost = base + sum over layers of (per_head * heads_i + per_neuron * neurons_i), at a fixed hidden size.

    base is the cost with every head and neuron pruned (embeddings, norms, the output biases, the LM head).
    """

    base: float
    per_head: float
    per_neuron: float

    def __post_init__(self) -> None:
        if self.per_head <= 0 or self.per_neuron <= 0:
            raise ValueError(f"LinearCost needs positive unit costs, got per_head={self.per_head}, "
                             f"per_neuron={self.per_neuron}.")

    def of(self, heads: list[int], neurons: list[int]) -> float:
        return self.base + self.per_head * sum(heads) + self.per_neuron * sum(neurons)


@dataclass
class LayerWidths:
    """Per-layer kept counts, their cost and kept score (the sum of the kept units' scores)."""

    heads: list[int]
    neurons: list[int]
    cost: float
    importance: float


@dataclass(frozen=True)
class _Dim:
    """One layer's heads or neurons, as the chunks a larger choice adds, most important first."""

    sizes: list[int]  # units in each chunk
    masses: list[float]  # summed scores of each chunk


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices, most important first (stable: ties keep index order, so the kept set is deterministic)."""
    return scores.double().argsort(descending=True, stable=True)


def _dim(scores: torch.Tensor, step: int) -> _Dim:
    ordered = scores.double()[_ranked(scores)]
    bounds = [*range(0, len(ordered), step), len(ordered)]
    return _Dim([b - a for a, b in zip(bounds, bounds[1:])],
                [ordered[a:b].sum().item() for a, b in zip(bounds, bounds[1:])])


def _dims(scores: dict[str, torch.Tensor], head_step: int, neuron_step: int) -> tuple[list[_Dim], list[_Dim]]:
    layers = sum(name.startswith("heads.") for name in scores)
    missing = [f"{kind}.{i}" for i in range(layers) for kind in ("heads", "ffn") if f"{kind}.{i}" not in scores]
    if missing or layers == 0:
        raise ValueError(f"GradNAS scores need heads.{{i}} and ffn.{{i}} for every layer; missing: {missing or 'all'}.")
    return ([_dim(scores[f"heads.{i}"], head_step) for i in range(layers)],
            [_dim(scores[f"ffn.{i}"], neuron_step) for i in range(layers)])


def _check_budget(cost: LinearCost, heads: list[_Dim], neurons: list[_Dim], budget: float) -> None:
    full = cost.of([sum(d.sizes) for d in heads], [sum(d.sizes) for d in neurons])
    if budget < cost.base:
        raise ValueError(f"Budget {budget:,.0f} is below the cost with every head and neuron pruned; the achievable "
                         f"range is [{cost.base:,.0f}, {full:,.0f}].")


def _counts(dims: list[_Dim], chunks: list[int]) -> list[int]:
    """Units kept when each dim keeps its first chunks[d] chunks."""
    return [sum(dim.sizes[:k]) for dim, k in zip(dims, chunks, strict=True)]


def _widths(cost: LinearCost, heads: list[_Dim], neurons: list[_Dim], head_chunks: list[int],
            neuron_chunks: list[int], budget: float) -> LayerWidths:
    head_counts, neuron_counts = _counts(heads, head_chunks), _counts(neurons, neuron_chunks)
    importance = sum(sum(d.masses[:k]) for d, k in zip(heads + neurons, head_chunks + neuron_chunks, strict=True))
    result = LayerWidths(head_counts, neuron_counts, cost.of(head_counts, neuron_counts), importance)
    assert result.cost <= budget, f"search returned cost {result.cost} over budget {budget}: {result}"
    return result


def threshold_search(scores: dict[str, torch.Tensor], cost: LinearCost, budget: float, head_step: int = 1,
                     neuron_step: int = 1) -> LayerWidths:
    """ModelOpt's GradNAS rule: one global threshold on each layer-dim's normalised pruned score mass.

    Args:
        scores: `{"heads.{i}": (heads,), "ffn.{i}": (neurons,)}` (gradnas_scores).
        cost: the linear cost of the kept counts.
        budget: the largest allowed cost.
        head_step, neuron_step: the granularity of each layer's kept counts.
    """
    heads, neurons = _dims(scores, head_step, neuron_step)
    _check_budget(cost, heads, neurons, budget)
    dims = heads + neurons
    # Removal steps: dim d drops its last r chunks at pruned mass m; m grows with r, so sorting by (m, d, r) keeps
    # each dim's steps in order and a prefix of the list is the set of steps at or under a threshold.
    steps = []
    for d, dim in enumerate(dims):
        total = sum(dim.masses)
        removed = 0.0
        for r, mass in enumerate(reversed(dim.masses), 1):
            removed += mass
            steps.append((removed / total if total > 0 else 0.0, d, r))
    steps.sort()

    def kept_after(prefix: int) -> list[int]:
        dropped = [0] * len(dims)
        for _, d, r in steps[:prefix]:
            dropped[d] = r
        return [len(dim.sizes) - n for dim, n in zip(dims, dropped)]

    def fits(prefix: int) -> bool:
        counts = _counts(dims, kept_after(prefix))
        return cost.of(counts[: len(heads)], counts[len(heads):]) <= budget

    lo, hi = 0, len(steps)  # fits(len(steps)) holds: everything pruned costs base <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    kept = kept_after(lo)
    return _widths(cost, heads, neurons, kept[: len(heads)], kept[len(heads):], budget)


def _global_order(dims: list[_Dim]) -> list[tuple[int, int]]:
    """(dim, chunk) pairs by score per unit, highest first. A dim's chunks hold its units in descending order, so
    their per-unit scores do not increase and every prefix keeps each dim's top units."""
    chunks = [(d, c) for d, dim in enumerate(dims) for c in range(len(dim.sizes))]
    return sorted(chunks, key=lambda dc: (-dims[dc[0]].masses[dc[1]] / dims[dc[0]].sizes[dc[1]], dc[0], dc[1]))


def knapsack_search(scores: dict[str, torch.Tensor], cost: LinearCost, budget: float, head_step: int = 1,
                    neuron_step: int = 1) -> LayerWidths:
    """Kwon et al.'s Fisher knapsack: the best (global top-h heads, global top-n neurons) pair within the budget.

    Args:
        scores: `{"heads.{i}": (heads,), "ffn.{i}": (neurons,)}` (gradnas_scores).
        cost: the linear cost of the kept counts.
        budget: the largest allowed cost.
        head_step, neuron_step: the granularity of each layer's kept counts.
    """
    heads, neurons = _dims(scores, head_step, neuron_step)
    _check_budget(cost, heads, neurons, budget)
    head_order, neuron_order = _global_order(heads), _global_order(neurons)
    # prefix sums over the global orders: units kept and score kept by the first k chunks
    head_units, head_mass = [0], [0.0]
    for d, c in head_order:
        head_units.append(head_units[-1] + heads[d].sizes[c])
        head_mass.append(head_mass[-1] + heads[d].masses[c])
    neuron_cost, neuron_mass = [0.0], [0.0]
    for d, c in neuron_order:
        neuron_cost.append(neuron_cost[-1] + cost.per_neuron * neurons[d].sizes[c])
        neuron_mass.append(neuron_mass[-1] + neurons[d].masses[c])

    best: tuple[float, int, int] | None = None
    for h, units in enumerate(head_units):
        left = budget - cost.base - cost.per_head * units
        if left < 0:
            break
        n = bisect.bisect_right(neuron_cost, left) - 1  # most neuron chunks that fit
        if best is None or head_mass[h] + neuron_mass[n] > best[0]:
            best = (head_mass[h] + neuron_mass[n], h, n)
    assert best is not None, "h = 0 always fits once budget >= base"
    _, h, n = best
    kept_heads, kept_neurons = [0] * len(heads), [0] * len(neurons)
    for d, _ in head_order[:h]:
        kept_heads[d] += 1
    for d, _ in neuron_order[:n]:
        kept_neurons[d] += 1
    return _widths(cost, heads, neurons, kept_heads, kept_neurons, budget)


SEARCHES = {"threshold": threshold_search, "knapsack": knapsack_search}


def gradnas_widths(rule: str, scores: dict[str, torch.Tensor], cost: LinearCost, budget: float, head_step: int = 1,
                   neuron_step: int = 1) -> LayerWidths:
    """Per-layer kept counts by `rule` (threshold | knapsack); see the module docstring."""
    if rule not in SEARCHES:
        raise ValueError(f"Unknown GradNAS search rule '{rule}'. Known: {', '.join(SEARCHES)}.")
    return SEARCHES[rule](scores, cost, budget, head_step, neuron_step)


def kept_units(scores: dict[str, torch.Tensor], widths: LayerWidths) -> dict[str, torch.Tensor]:
    """The kept indices of every layer-dim: its top-scored units, in ascending index order."""
    kept = {}
    for i, (h, n) in enumerate(zip(widths.heads, widths.neurons)):
        for name, k in ((f"heads.{i}", h), (f"ffn.{i}", n)):
            kept[name] = _ranked(scores[name])[:k].sort().values
    return kept
