"""Budgets (`prune.constraints`) and the profile of a search space against them.

A constraint is absolute (`3e7`, `"30M"`, `"2.5G"`) or relative to the unpruned model (`"60%"`). Before any
gradient or candidate is computed, the search space is profiled the way ModelOpt's NAS prints it: the cost of its
smallest, centroid and largest subnet per constraint, the max/min ratio, whether each bound is reachable, the number
of configurable choices and the size of the space. An unreachable bound stops the run with the achievable range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from llmprune.errors import ConfigError

CONSTRAINT_KEYS = ("params", "flops", "memory", "latency")
SUFFIXES = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGBT%]?)\s*$", re.IGNORECASE)


def parse_constraint(key: str, value, reference: float, prefix: str = "prune.constraints.") -> float:
    """The absolute bound of one constraint; `reference` is the unpruned model's cost (what "%" is relative to)."""
    name = prefix + key
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={value!r} is not a budget; give a number (3e7, \"30M\") or a share (\"60%\").")
    if isinstance(value, (int, float)):
        bound = float(value)
    else:
        m = _NUMBER.match(str(value))
        if not m:
            raise ConfigError(f"{name}={value!r} is not a budget; give a number (3e7, \"30M\", \"2.5G\") or a share "
                              "of the unpruned model (\"60%\").")
        number, unit = float(m.group(1)), m.group(2).upper()
        if unit == "%":
            if not 0 < number <= 100:
                raise ConfigError(f"{name}={value!r}: a share must be in (0%, 100%].")
            bound = reference * number / 100
        else:
            bound = number * SUFFIXES.get(unit, 1.0)
    if not math.isfinite(bound) or bound <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number.")
    return bound


def parse_constraints(raw: dict, reference: dict[str, float], supported: tuple[str, ...] = CONSTRAINT_KEYS,
                      prefix: str = "prune.constraints.") -> dict[str, float]:
    """Absolute bounds of every set constraint (None entries are unset)."""
    raw = {k: v for k, v in (raw or {}).items() if v is not None}
    unknown = sorted(set(raw) - set(supported))
    if unknown:
        raise ConfigError(f"unknown constraint {', '.join(prefix + k for k in unknown)}; this mode supports "
                          f"{', '.join(prefix + k for k in supported)}.")
    return {k: parse_constraint(k, v, reference[k], prefix) for k, v in raw.items()}


def human(value: float) -> str:
    """3.1M, 1.28G: costs as the profile prints them."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


@dataclass
class Profile:
    """Costs of the smallest, centroid and largest subnet of a search space, and the bounds against them.

    Attributes:
        costs: per subnet ("min", "centroid", "max"), its cost per constraint key.
        bounds: the absolute bounds being checked.
        choices: per configurable hparam, its choices (ascending).
    """

    costs: dict[str, dict[str, float]]
    bounds: dict[str, float]
    choices: dict[str, list[int]]
    prefix: str = "prune.constraints."  # how errors name the bounds

    @property
    def space_size(self) -> float:
        return math.prod(float(len(c)) for c in self.choices.values())

    @property
    def configurable(self) -> int:
        return sum(len(c) > 1 for c in self.choices.values())

    def satisfiable(self, key: str) -> bool:
        return self.costs["min"][key] <= self.bounds[key]

    def check(self) -> None:
        """ConfigError naming every bound below the smallest subnet's cost, with the achievable range."""
        problems = [f"{self.prefix}{k}={human(b)} is below the smallest subnet's {human(self.costs['min'][k])}; "
                    f"the search space spans {human(self.costs['min'][k])} .. {human(self.costs['max'][k])}"
                    for k, b in self.bounds.items() if not self.satisfiable(k)]
        if problems:
            raise ConfigError("; ".join(problems) + ". Raise the bound (or widen the search space).")

    def rows(self) -> list[list[str]]:
        """Profile rows: constraint, min, centroid, max, max/min ratio."""
        out = []
        for key in self.costs["max"]:
            lo, mid, hi = (self.costs[s][key] for s in ("min", "centroid", "max"))
            out.append([key, human(lo), human(mid), human(hi), f"{hi / lo:.2f}" if lo else "inf"])
        return out

    def bound_rows(self) -> list[list[str]]:
        return [[k, human(b), str(self.satisfiable(k))] for k, b in self.bounds.items()]

    def summary_lines(self) -> list[str]:
        return [f"Number of configurable hparams: {self.configurable}",
                f"Total size of the search space: {self.space_size:.2e}",
                "Note: all constraints can be satisfied within the search space!"
                if all(self.satisfiable(k) for k in self.bounds) else "Note: some constraints cannot be satisfied."]

    def markdown(self) -> str:
        """The profile as report.md prints it."""
        def table(head, rows):
            return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                              *("| " + " | ".join(r) + " |" for r in rows)])

        return "\n\n".join([table(["constraint", "min", "centroid", "max", "max/min ratio"], self.rows()),
                            table(["constraint", "upper bound", "satisfiable"], self.bound_rows()),
                            "\n".join(f"- {line}" for line in self.summary_lines())])

    def print(self, file=None) -> None:
        """Rich tables on the console (stderr by default)."""
        import sys

        from rich.console import Console
        from rich.table import Table

        console = Console(file=file or sys.stderr)
        results = Table(title="Profiling results")
        for column in ("Constraint", "min", "centroid", "max", "max/min ratio"):
            results.add_column(column)
        for row in self.rows():
            results.add_row(*row)
        bounds = Table(title="Constraints evaluation")
        for column in ("Constraint", "Upper bound", "Satisfiable"):
            bounds.add_column(column)
        for row in self.bound_rows():
            bounds.add_row(*row)
        console.print(results, bounds)
        for line in self.summary_lines():
            console.print(line)


def profile(choices: dict[str, list[int]], cost: Callable[[dict[str, int]], dict[str, float]],
            bounds: dict[str, float], prefix: str = "prune.constraints.") -> Profile:
    """Profile a search space: `choices` per hparam (ascending), `cost(choice)` -> {constraint: cost}.

    The centroid takes each hparam's middle choice (ModelOpt's definition).
    """
    subnets = {"min": {k: c[0] for k, c in choices.items()},
               "centroid": {k: c[len(c) // 2] for k, c in choices.items()},
               "max": {k: c[-1] for k, c in choices.items()}}
    return Profile({name: cost(choice) for name, choice in subnets.items()}, bounds, choices, prefix)
