"""Multi-objective search (`search.objectives=[kl, latency]`): NSGA-II over the grid, the Pareto front of the scored
candidates, written as CSV and PNG, and the pick (`search.pick=knee|best_under_budget`).

NSGA-II comes from pymoo rather than optuna: pymoo's ask/tell hands over a whole generation at once, takes the
budgets as inequality constraints (feasible candidates first, infeasible ones by their violation, Deb's rule, so an
over-budget candidate is never scored), and runs on integer genes (one choice index per searched dimension, SBX and
polynomial mutation with rounding) without a storage backend. optuna's NSGAIISampler asks one trial at a time and
keeps its trials in a study database, which the search's own resumable state (state.py) would duplicate. With a
fixed seed the same generations are asked again after a restart, and their scores come from the state.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmprune.search.space import ANALYTIC, Candidate, SearchSpace, candidate_key

OBJECTIVES = ("kl", "params", "flops", "memory", "latency")
PICKS = ("knee", "best_under_budget")
_INFEASIBLE = 1e30  # objective value of an over-budget candidate: NSGA-II ranks it by its violation, never by this


def dominates(a: list[float], b: list[float]) -> bool:
    """a is no worse than b in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(points: list[list[float]]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def knee(points: list[list[float]]) -> int:
    """The front point farthest below the chord between the front's two extremes of the first two objectives
    (normalised to [0, 1]): where a small loss in one objective buys the most of the other. More than two objectives:
    the point nearest the normalised ideal point."""
    arr = np.asarray(points, dtype=np.float64)
    span = arr.max(0) - arr.min(0)
    norm = (arr - arr.min(0)) / np.where(span > 0, span, 1.0)
    if arr.shape[1] != 2 or len(arr) < 3:
        return int(np.argmin(np.linalg.norm(norm, axis=1)))
    a, b = norm[np.argmin(norm[:, 0])], norm[np.argmin(norm[:, 1])]
    direction = (b - a) / (np.linalg.norm(b - a) or 1.0)
    distance = (norm[:, 0] - a[0]) * direction[1] - (norm[:, 1] - a[1]) * direction[0]  # signed, below the chord > 0
    return int(np.argmax(distance))


def nsga2(space: SearchSpace, bounds: dict[str, float], objectives: tuple[str, ...],
          kl: Callable[[list[Candidate]], list[float]], population: int, generations: int,
          seed: int) -> list[Candidate]:
    """Run NSGA-II; returns every within-budget candidate it evaluated (each once), costs and "kl" filled in.

    `kl` takes all within-budget candidates of one generation at once (so a torchrun search deals them out across
    its ranks) and returns their KL in order.
    """
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.problems.static import StaticProblem

    genes = [k for k, c in space.choices.items() if len(c) > 1]  # a single choice is no gene
    fixed = {k: c[0] for k, c in space.choices.items() if len(c) == 1}
    problem = Problem(n_var=len(genes), n_obj=len(objectives), n_ieq_constr=max(1, len(bounds)), xl=0,
                      xu=np.array([len(space.choices[k]) - 1 for k in genes]), vtype=int)
    algorithm = NSGA2(pop_size=population, sampling=IntegerRandomSampling(),
                      crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    seen: dict[str, Candidate] = {}

    def candidate(genome) -> Candidate:
        target = {**fixed, **{k: space.choices[k][int(i)] for k, i in zip(genes, genome)}}
        return seen.get(candidate_key(target)) or space.candidate(target)

    def violation(c: Candidate, keys: tuple[str, ...]) -> list[float]:
        """Relative excess over each bound among `keys` (<= 0: within); the other bounds count as met."""
        return [c.costs[k] / b - 1 if k in keys else 0.0 for k, b in bounds.items()] or [0.0]

    while algorithm.has_next():
        pop = algorithm.ask()
        rows = [(c, violation(c, ANALYTIC)) for c in map(candidate, pop.get("X"))]
        if "latency" in bounds or "latency" in objectives:  # timed only when every analytic bound holds
            space.measure([c for c, v in rows if max(v) <= 0])
            rows = [(c, violation(c, ANALYTIC + ("latency",)) if max(v) <= 0 else v) for c, v in rows]
        feasible = list({c.key: c for c, v in rows if max(v) <= 0}.values())
        if "kl" in objectives:
            for c, value in zip(feasible, kl(feasible) if feasible else [], strict=True):
                c.costs["kl"] = value
        seen.update({c.key: c for c in feasible})
        F = [[c.costs[o] for o in objectives] if max(v) <= 0 else [_INFEASIBLE] * len(objectives) for c, v in rows]
        Evaluator().eval(StaticProblem(problem, F=np.array(F), G=np.array([v for _, v in rows])), pop)
        algorithm.tell(infills=pop)
    return list(seen.values())


def front_of(evaluated: list[Candidate], objectives: tuple[str, ...]) -> list[Candidate]:
    """The non-dominated candidates, sorted by the first objective."""
    points = [[c.costs[o] for o in objectives] for c in evaluated]
    front = [evaluated[i] for i in pareto_front(points)]
    return sorted(front, key=lambda c: (c.costs[objectives[0]], c.key))


def pick(front: list[Candidate], objectives: tuple[str, ...], how: str) -> Candidate:
    """knee: the knee of the front; best_under_budget: the lowest KL (every front point is within the budgets)."""
    if how == "best_under_budget":
        return min(front, key=lambda c: (c.costs["kl"], c.key))
    return front[knee([[c.costs[o] for o in objectives] for c in front])]


def write_csv(path: Path, evaluated: list[Candidate], front: list[Candidate], chosen: Candidate) -> None:
    """One row per evaluated candidate: sizes, costs, KL, on_front, picked."""
    keys = {c.key for c in front}
    columns = ["key", *evaluated[0].target, *sorted({k for c in evaluated for k in c.costs}), "on_front", "picked"]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for c in sorted(evaluated, key=lambda c: c.key):
            writer.writerow({"key": c.key, **c.target, **c.costs, "on_front": c.key in keys,
                             "picked": c.key == chosen.key})
    tmp.replace(path)


def plot_front(path: Path, evaluated: list[Candidate], front: list[Candidate], chosen: Candidate,
               objectives: tuple[str, ...], marks: dict[str, list[float]] | None = None) -> None:
    """PNG of the first two objectives: every evaluated candidate, the front, the pick and `marks` (name -> point,
    e.g. a hand-picked target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([c.costs[x] for c in evaluated], [c.costs[y] for c in evaluated], s=12, color="0.7", label="evaluated")
    ax.plot([c.costs[x] for c in front], [c.costs[y] for c in front], "o-", color="tab:blue", label="Pareto front")
    ax.scatter([chosen.costs[x]], [chosen.costs[y]], marker="*", s=250, color="tab:red", zorder=3, label="pick")
    for name, point in (marks or {}).items():
        ax.scatter([point[0]], [point[1]], marker="D", s=60, zorder=3, label=name)
    ax.set(xlabel=x, ylabel=y, title="NSGA-II search: Pareto front")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
