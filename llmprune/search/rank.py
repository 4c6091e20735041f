"""Ranking candidates: KL to the teacher after pruning, then after a short distillation, with the score's noise.

ModelOpt scores the largest candidates under the budget on the pruned model only, and its authors note how noisy
that is (top-10 candidates of one Qwen3-8B search spanned 0.25 to 0.58 MMLU); the Minitron paper distilled every
candidate before ranking because ranks move after training. Here:
1. the `top_k` candidates that use most of the budget are pruned from the existing calibration scores (no
   re-calibration) and scored by KL(teacher || pruned) per token on held-out text;
2. the best `finalists` by that KL are each distilled for `distill_tokens` tokens and scored again; the pick is the
   best distilled one;
3. the noise: every score is taken on two disjoint halves of the held-out samples (a and b); the report gives the
   mean relative gap |kl_a - kl_b| / kl and the Spearman correlation of the rankings by a and by b, and the
   Spearman correlation of the pruned-only and the distilled rankings of the finalists.

Under torchrun the pruned candidates are dealt out: in each turn rank r scores the r-th missing candidate on its
own (the whole held-out set, no collective inside), and the score rows are gathered on every rank with one sum, so
every rank holds the same state and a 2-process search scores what a 1-process search scores, the same way. A
finalist's short distillation is collective instead (DDP over all ranks, each with its share of the data).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from llmprune.distributed import all_reduce_sum, is_distributed, world_size
from llmprune.distributed import rank as process_rank
from llmprune.search.space import Candidate
from llmprune.search.state import SearchState

log = logging.getLogger("llmprune")

Scorer = Callable[[Candidate], dict]
FIELDS = ("kl", "kl_a", "kl_b", "perplexity")  # a pruned score row (`combined`), as gathered across ranks


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks); None for fewer than two points or a constant side."""
    assert len(a) == len(b), (len(a), len(b))
    if len(a) < 2:
        return None
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(ra.norm() * rb.norm())
    return float(ra @ rb) / norm if norm else None


def halves(samples: torch.Tensor, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the held-out samples (a: the first, b: the second), each a multiple of `parts` samples
    (the process count, so that each process evaluates an equal share of a half during a collective distillation)."""
    middle = len(samples) // 2 // parts * parts
    if middle < 1:
        raise ValueError(f"the noise estimate needs 2 held-out samples per process ({parts}), got {len(samples)}")
    return samples[:middle], samples[middle: 2 * middle]


def combined(a: dict, b: dict) -> dict:
    """One score row from the two halves' evaluations (equal token counts, so the mean is the full-set score)."""
    return {"kl": (a["kl_to_teacher"] + b["kl_to_teacher"]) / 2, "kl_a": a["kl_to_teacher"],
            "kl_b": b["kl_to_teacher"], "perplexity": (a["perplexity"] * b["perplexity"]) ** 0.5}


def _gather_device() -> torch.device:
    """Where a gathered tensor travels: CUDA for nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dealt(group: list[Candidate], score: Scorer) -> list[dict]:
    """Candidate i of `group` (at most one per rank) scored by rank i alone; its row, with the rank that scored it
    under "process", gathered on every rank (a sum of rows that are zero except on the rank that scored it, so every
    value arrives bit for bit)."""
    assert len(group) <= world_size(), (len(group), world_size())
    values = torch.zeros(len(group), len(FIELDS) + 1, dtype=torch.float64)
    me = process_rank()
    if me < len(group):
        row = score(group[me])
        values[me] = torch.tensor([*(row[f] for f in FIELDS), me], dtype=torch.float64)
    values = all_reduce_sum(values.to(_gather_device())).cpu()
    return [{**dict(zip(FIELDS, v[:-1])), "process": int(v[-1])} for v in values.tolist()]


def score_missing(candidates: list[Candidate], scored: dict[str, dict], score: Scorer, state: SearchState,
                  what: str, deal: bool = False) -> tuple[int, float]:
    """Score the candidates `scored` lacks, saving the state after each (with `deal`, after each turn of one
    candidate per rank: `score` then runs on one process alone). Returns how many were scored and the seconds."""
    missing = [c for c in candidates if c.key not in scored]
    turn = world_size() if deal else 1
    started = time.perf_counter()
    for start in range(0, len(missing), turn):
        group = missing[start: start + turn]
        rows = dealt(group, score) if deal else [score(group[0])]
        for c, row in zip(group, rows, strict=True):
            scored[c.key] = row
            log.info(f"search: {what} {candidates.index(c) + 1}/{len(candidates)} {c.key}: KL {row['kl']:.4f}")
        state.save()
    return len(missing), time.perf_counter() - started


def noise(rows: list[dict]) -> dict:
    """The score's noise over `rows` ({kl, kl_a, kl_b}): relative gap between the halves and their rank agreement."""
    gaps = [abs(r["kl_a"] - r["kl_b"]) / r["kl"] for r in rows if r["kl"] > 0]
    return {"mean_relative_gap": sum(gaps) / len(gaps) if gaps else None,
            "halves_spearman": spearman([r["kl_a"] for r in rows], [r["kl_b"] for r in rows])}


def rank(candidates: list[Candidate], top_k: int, finalists: int, state: SearchState, score_pruned: Scorer,
         score_distilled: Scorer, deal: bool = False) -> dict:
    """Score the first `top_k` candidates after pruning and the best `finalists` of them after distillation.

    `deal`: the pruned candidates are dealt out across torchrun ranks (`score_pruned` runs on one process alone);
    `score_distilled` always runs on every rank together.

    Returns:
        {pick, runners_up, scored (rows of every scored candidate, best first), finalists, noise, rank_correlation,
        newly_scored: {pruned, distilled}, score_seconds: {pruned, distilled} (of the newly scored)}.
    """
    top = candidates[:top_k]
    new_pruned, pruned_s = score_missing(top, state.pruned, score_pruned, state, "pruned", deal)
    by_pruned = sorted(top, key=lambda c: (state.pruned[c.key]["kl"], c.key))
    chosen = by_pruned[:finalists]
    new_distilled, distilled_s = score_missing(chosen, state.distilled, score_distilled, state, "distilled")
    final = sorted(chosen, key=lambda c: (state.distilled[c.key]["kl"], c.key)) if chosen else by_pruned
    rows = []
    for c in by_pruned:
        row = {"key": c.key, **c.target, **c.costs, **{f"pruned_{k}": v for k, v in state.pruned[c.key].items()}}
        if c.key in state.distilled:
            row.update({f"distilled_{k}": v for k, v in state.distilled[c.key].items()})
        rows.append(row)
    return {"pick": final[0], "runners_up": [c.key for c in final[1:4]], "scored": rows,
            "finalists": [c.key for c in final], "noise": {"pruned": noise([state.pruned[c.key] for c in top]),
                      "distilled": noise([state.distilled[c.key] for c in chosen])},
            "rank_correlation": spearman([state.pruned[c.key]["kl"] for c in chosen],
                                         [state.distilled[c.key]["kl"] for c in chosen]),
            "newly_scored": {"pruned": new_pruned, "distilled": new_distilled},
            "score_seconds": {"pruned": round(pruned_s, 2), "distilled": round(distilled_s, 2)}}
