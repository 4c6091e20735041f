"""The candidate architectures of a Minitron search: per-dimension grids, their costs from the cost model, and the
candidates within every budget.

ModelOpt's `mcore_minitron` search (0.42+) is the model: each searched dimension takes the multiples of a divisor
(hidden 256, FFN 512, Mamba head dim 8, layers 2; attention heads in multiples of the KV group count so every group
keeps as many heads; Mamba heads in multiples of n_groups) from a lowest fraction of the original (widths 60%,
depth 80%) up to the original, and the Cartesian product is costed analytically. The divisors scale down for small
models (`auto_divisor`), so SmolLM2's 576-wide hidden state gets eight choices instead of one. KV groups are not
searched (as in ModelOpt): removing a group removes its heads too, which the head count already covers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from llmprune.errors import ConfigError
from llmprune.plan.constraints import Profile, parse_constraints, profile

SEARCH_DIMS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "mamba_num_heads",
               "mamba_head_dim")
MODELOPT_DIVISORS = {"hidden_size": 256, "ffn_hidden_size": 512, "mamba_head_dim": 8, "num_layers": 2}
ANALYTIC = ("params", "flops", "memory")  # costs the cost model computes; latency is measured
# one cost-model pass each, ~0.03-0.07 s for a 30-36-layer model on one CPU core (Qwen3-8B's 560 grid points: 20-40 s
# on a busy 2-core host), so ~15 minutes of enumeration at this size
MAX_CANDIDATES = 20_000


def auto_divisor(key: str, dims: dict[str, int]) -> int:
    """ModelOpt's divisor, or for a small model the power of two that leaves ~16 steps across the whole width.

    Heads move in multiples of the KV group count (Mamba heads: of n_groups), so every group keeps the same count.
    """
    if key == "num_attention_heads":
        return dims["num_query_groups"]
    if key == "mamba_num_heads":
        return dims["mamba_num_groups"]
    if key == "num_layers":
        return MODELOPT_DIVISORS["num_layers"]
    return min(MODELOPT_DIVISORS[key], max(1, 2 ** int(math.log2(max(1, dims[key] // 16)))))


def grid(full: int, divisor: int, lowest_fraction: float) -> list[int]:
    """The multiples of `divisor` from ceil(lowest_fraction * full) to `full`, and `full` itself (ascending)."""
    low = math.ceil(lowest_fraction * full - 1e-9)
    return sorted({m for m in range(divisor, full + 1, divisor) if m >= low} | {full})


def search_choices(dims: dict[str, int], divisors: dict, fractions: dict,
                   prefix: str = "search.") -> dict[str, list[int]]:
    """Per searched dimension of this model, its grid. Raises one ConfigError listing every bad divisor / fraction
    (naming the key) and a space too large to enumerate or holding only the unpruned model."""
    problems, choices = [], {}
    for key in (k for k in SEARCH_DIMS if k in dims):
        divisor = divisors.get(key)
        divisor = auto_divisor(key, dims) if divisor is None else divisor
        fraction = fractions.get(key)
        if fraction is None or not 0 < fraction <= 1:
            problems.append(f"{prefix}lowest_fraction.{key}={fraction} must lie in (0, 1] (1 keeps the dimension).")
            continue
        if divisor < 1:
            problems.append(f"{prefix}divisors.{key}={divisor} must be at least 1 (or null: automatic).")
            continue
        step = {"num_attention_heads": "num_query_groups", "mamba_num_heads": "mamba_num_groups"}.get(key)
        if step and divisor % dims[step]:
            problems.append(f"{prefix}divisors.{key}={divisor} must be a multiple of the model's {step}="
                            f"{dims[step]} (every group keeps the same number of heads); choose e.g. {dims[step]}.")
            continue
        choices[key] = grid(dims[key], divisor, fraction)
    size = math.prod(len(c) for c in choices.values())
    if not problems and size > MAX_CANDIDATES:
        shape = " x ".join(str(len(c)) for c in choices.values())
        problems.append(f"the search space holds {size:,} candidates ({shape}), more than {MAX_CANDIDATES:,}; raise "
                        f"{prefix}divisors.* or {prefix}lowest_fraction.*.")
    if not problems and size == 1:
        problems.append(f"the search space holds only the unpruned model; lower {prefix}lowest_fraction.* or the "
                        f"{prefix}divisors.* (the grids are {choices}).")
    if problems:
        raise ConfigError("Invalid search space:\n  - " + "\n  - ".join(problems))
    return choices


def candidate_key(target: dict[str, int]) -> str:
    """A stable name of a candidate shape (state, caches, search.csv)."""
    return ",".join(f"{k}={target[k]}" for k in SEARCH_DIMS if k in target)


@dataclass
class Candidate:
    """One architecture of the space: its target sizes, the layers it keeps and its costs."""

    target: dict[str, int]
    kept_layers: list[int]
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return candidate_key(self.target)


@dataclass
class SearchSpace:
    """The grids of one model and the costs of any point of them.

    Attributes:
        cost: the adapter's CostModel.
        dims: the model's sizes (adapter.dims()).
        choices: per searched dimension, its grid (`search_choices`).
        seq_len / batch_size / dtype: FLOPs per sequence of seq_len tokens; memory = weights at dtype + the KV / SSM
            cache of batch_size sequences of seq_len tokens.
        layers_for: depth -> the original layers a candidate of that depth keeps (from the depth scores, as the plan
            will choose them); None keeps the first layers (uniform layers cost the same wherever they are).
        latency: candidates -> their measured seconds (`latency.LatencyMeter`, which times shapes asked for together
            in turns), only when a latency budget or objective asks for it.
        accepts: target -> whether a stock config can hold the shape (export's rule); others are not candidates.
    """

    cost: object
    dims: dict[str, int]
    choices: dict[str, list[int]]
    seq_len: int
    batch_size: int = 1
    dtype: str = "bfloat16"
    layers_for: Callable[[int], list[int]] | None = None
    latency: Callable[[list[Candidate]], list[float]] | None = None
    accepts: Callable[[dict[str, int]], bool] | None = None

    @property
    def size(self) -> int:
        return math.prod(len(c) for c in self.choices.values())

    def candidate(self, target: dict[str, int]) -> Candidate:
        """The candidate at `target` (searched keys; the others keep the model's sizes) with its analytic costs."""
        full = {**{k: self.dims[k] for k in SEARCH_DIMS if k in self.dims}, **target}
        depth = full["num_layers"]
        kept = self.layers_for(depth) if self.layers_for else list(range(depth))
        c = Candidate(full, kept)
        memory = self.cost.memory(full, kept, self.dtype, self.batch_size, self.seq_len)["total"]
        c.costs = {"params": float(self.cost.params(full, kept)),
                   "flops": float(self.cost.flops(self.seq_len, full, kept)), "memory": float(memory)}
        return c

    def costs(self, target: dict[str, int], keys: tuple[str, ...]) -> dict[str, float]:
        """`keys` costs of `target` (latency measured)."""
        c = self.candidate(target)
        if "latency" in keys:
            self.measure([c])
        return {k: c.costs[k] for k in keys}

    def measure(self, candidates: list[Candidate]) -> None:
        """Fill in costs["latency"] of the candidates that lack it, timed together."""
        todo = [c for c in candidates if "latency" not in c.costs]
        if not todo:
            return
        if self.latency is None:
            raise ConfigError("a latency budget or objective needs a latency meter (search.latency_repeats).")
        for c, seconds in zip(todo, self.latency(todo), strict=True):
            c.costs["latency"] = seconds

    def reference(self, keys: tuple[str, ...]) -> dict[str, float]:
        """Costs of the unpruned model: what a "60%" budget is relative to."""
        return self.costs({}, keys)

    def profile(self, raw_constraints: dict, prefix: str = "prune.constraints.") -> Profile:
        """The profile table against `prune.constraints`; `.check()` stops on a bound below the smallest candidate."""
        keys = tuple(k for k, v in raw_constraints.items() if v is not None)
        bounds = parse_constraints(raw_constraints, self.reference(keys), prefix=prefix)
        return profile(self.choices, lambda choice: self.costs(choice, keys), bounds, prefix)

    def candidates(self, bounds: dict[str, float]) -> list[Candidate]:
        """Every grid point within every bound, the ones using most of their budget first (ModelOpt sorts by size).

        Analytic bounds are checked first, so only their survivors are timed for a latency bound; shapes that no
        stock config can express (`accepts`) are left out.
        """
        keys = list(self.choices)
        kept = []
        for values in itertools.product(*self.choices.values()):
            c = self.candidate(dict(zip(keys, values)))
            within = all(c.costs[k] <= b for k, b in bounds.items() if k in ANALYTIC)
            if within and (self.accepts is None or self.accepts(c.target)):
                kept.append(c)
        if "latency" in bounds:
            self.measure(kept)
            kept = [c for c in kept if c.costs["latency"] <= bounds["latency"]]
        return sorted(kept, key=lambda c: (-max((c.costs[k] / b for k, b in bounds.items()), default=0.0), c.key))
