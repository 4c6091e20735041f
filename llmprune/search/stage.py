"""The search stage of a run (prune.mode=minitron with prune.constraints), between calibrate and plan.

Before calibration: the space is built and profiled against the budgets (an unreachable bound stops the run with the
achievable range). After calibration: candidates are pruned from the existing scores and ranked (rank.py), or with
several objectives searched by NSGA-II (pareto.py); the pick's target sizes go to the plan stage as export_config.
Everything scored is in search/state.json, so a killed search re-scores nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.distributed import barrier, is_rank_zero, rank, world_size
from llmprune.errors import ConfigError
from llmprune.evaluate import evaluate
from llmprune.export.hf import check_exportable
from llmprune.plan import choose_layers, make_plan
from llmprune.plan.constraints import Profile
from llmprune.search.latency import LatencyMeter
from llmprune.search.pareto import front_of, nsga2, pick, plot_front, write_csv
from llmprune.search.rank import combined, halves, score_missing
from llmprune.search.rank import rank as rank_candidates
from llmprune.search.space import Candidate, SearchSpace, search_choices
from llmprune.search.state import SearchState
from llmprune.stages.distillation import distill_student

log = logging.getLogger("llmprune")


def is_search(cfg: DictConfig) -> bool:
    """prune.mode=minitron with a budget: the architecture is searched."""
    return cfg.prune.mode == "minitron" and any(v is not None for v in cfg.prune.constraints.values())


def search_space(cfg: DictConfig, teacher: torch.nn.Module, adapter, run_dir: Path) -> SearchSpace:
    """The grids of this model (search.divisors / lowest_fraction), its cost model and, when a latency budget or
    objective needs it, the latency meter."""
    s = cfg.search
    dims = adapter.dims()
    choices = search_choices(dims, OmegaConf.to_container(s.divisors), OmegaConf.to_container(s.lowest_fraction))
    types = getattr(adapter, "layer_types", None)
    if types and len(set(types)) > 1 and len(choices["num_layers"]) > 1:
        raise ConfigError("searching num_layers of a hybrid model (its layer types differ) is not supported yet: the "
                          "layers a candidate removes come from depth scores computed after the profile; set "
                          "search.lowest_fraction.num_layers=1.")
    seq_len = s.seq_len or cfg.data.seq_len
    meter = None
    if cfg.prune.constraints.latency is not None or "latency" in s.objectives:
        meter = LatencyMeter(teacher, adapter, s.batch_size, seq_len, s.latency_repeats,
                             run_dir / "search" / "latency.json")

    def accepts(target: dict[str, int]) -> bool:
        try:
            check_exportable(adapter, {**dims, **target}, cfg.export.architecture)
        except ConfigError:
            return False
        return True

    return SearchSpace(adapter.cost_model(), dims, choices, seq_len, s.batch_size, s.memory_dtype, latency=meter,
                       accepts=accepts)


def search_depth_needs(depth: DictConfig, dims: dict, space: SearchSpace) -> dict:
    """The removal scores every depth of the grid reads (stages.calibration.depth_needs, for all depths at once)."""
    drops = tuple(dims["num_layers"] - n for n in space.choices["num_layers"] if n < dims["num_layers"])
    if not drops or depth.method == "block_importance":
        return {"drop_one": False, "block_sizes": ()}
    return {"drop_one": depth.method == "drop_one", "block_sizes": drops if depth.method == "contiguous" else ()}


def short_distill(distill: DictConfig, tokens: int, seq_len: int) -> DictConfig:
    """distill.* with its own schedule over `tokens` tokens: one evaluation and one checkpoint, at the end."""
    d = OmegaConf.to_container(distill)
    steps = max(1, math.ceil(tokens / (d["global_batch_size"] * seq_len)))
    d.update(max_steps=steps, warmup_steps=min(d["warmup_steps"], steps // 4), eval_every=steps, save_every=steps,
             keep_checkpoints=1, teacher_correction_steps=0)
    return OmegaConf.create(d)


def search_fingerprint(cfg: DictConfig, calibration: str) -> str:
    """What the scores depend on: the calibration scores, the held-out data, how plans are made, the search and the
    short distillation's settings and the budgets."""
    keys = [calibration, OmegaConf.to_container(cfg.search), OmegaConf.to_container(cfg.prune.constraints),
            OmegaConf.to_container(cfg.prune.depth), cfg.prune.rescale_norms, OmegaConf.to_container(cfg.distill)]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


HELDOUT_LOGITS_BYTES = 2 * 2**30  # the teacher's held-out logits are kept for every candidate up to this size


class HeldoutTeacher:
    """The teacher as `evaluate(..., teacher=)` calls it, its logits of each held-out batch computed once: every
    candidate is compared with the same teacher outputs, so scoring K candidates costs K + 1 forward passes instead
    of 2K (the scores are bit for bit those of the live teacher)."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher, self.logits = teacher, {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        key = hashlib.sha1(input_ids.cpu().numpy().tobytes() + (b"" if attention_mask is None else
                                                                attention_mask.cpu().numpy().tobytes())).digest()
        if key not in self.logits:
            with torch.no_grad():
                self.logits[key] = self.teacher(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return SimpleNamespace(logits=self.logits[key])


class Scorers:
    """KL to the teacher of a candidate pruned from the calibration scores, and after a short distillation, each on
    two disjoint halves of the held-out samples.

    `heldout` is every held-out sample (the same on every rank). A pruned candidate is scored by one process alone on
    both whole halves (the search deals the candidates out across ranks); a finalist's distillation runs on every
    rank together, each evaluating its share of each half, the sums all-reduced: the same samples either way.
    """

    def __init__(self, cfg: DictConfig, teacher: torch.nn.Module, adapter, scores: dict, heldout: torch.Tensor,
                 train: torch.Tensor, run_dir: Path, fingerprint: str):
        self.cfg, self.teacher, self.adapter, self.scores, self.train = cfg, teacher, adapter, scores, train
        world = world_size()
        try:
            a, b = halves(heldout, world)
        except ValueError:
            raise ConfigError(f"data.eval_samples gives {len(heldout)} held-out samples; the search scores every "
                              f"candidate on two halves with a share for each of the {world} processes: raise "
                              f"data.eval_samples to at least {2 * world}.") from None
        self.a, self.b = (text.to_batches(h, cfg.data.batch_size) for h in (a, b))
        self.a_share, self.b_share = (text.to_batches(h[rank():: world], cfg.data.batch_size) for h in (a, b))
        dtype = next(teacher.parameters()).dtype
        logits_bytes = 2 * a.shape[0] * a.shape[1] * teacher.config.vocab_size * dtype.itemsize
        self.heldout_teacher = HeldoutTeacher(teacher) if logits_bytes <= HELDOUT_LOGITS_BYTES else teacher
        self.run_dir, self.fingerprint = run_dir, f"{fingerprint}-{len(a)}"  # halves cut for another count differ

    def plan(self, c: Candidate):
        p = self.cfg.prune
        plan = make_plan(self.adapter.family, self.scores, self.adapter.dims(), c.target, p.depth.method,
                         p.depth.metric, p.rescale_norms, layer_types=getattr(self.adapter, "layer_types", None))
        assert plan.kept_layers == c.kept_layers, (c.key, plan.kept_layers, c.kept_layers)
        return plan

    def pruned(self, c: Candidate) -> dict:
        """Run by one process alone (no collective): the search deals the pruned candidates out across ranks."""
        student = get_adapter(self.teacher).apply(self.plan(c))
        teacher = self.heldout_teacher
        return combined(evaluate(student, self.a, teacher=teacher, desc="search: half a", reduce=False),
                        evaluate(student, self.b, teacher=teacher, desc="search: half b", reduce=False))

    def distilled(self, c: Candidate) -> dict:
        plan = self.plan(c)
        student_adapter = get_adapter(self.teacher)
        student = student_adapter.apply(plan)
        folder = self.run_dir / "search" / "finalists" / hashlib.sha1(c.key.encode()).hexdigest()[:10]
        if is_rank_zero():
            folder.mkdir(parents=True, exist_ok=True)
        barrier()
        d = short_distill(self.cfg.distill, self.cfg.search.distill_tokens, self.train.shape[1])
        history = distill_student(d, self.cfg.seed, student, student_adapter, self.teacher, plan, self.train,
                                  self.a_share, folder, self.fingerprint)
        last = history[-1]
        a = {"kl_to_teacher": last["eval_kl"], "perplexity": last["eval_perplexity"]}
        result = combined(a, evaluate(student, self.b_share, teacher=self.teacher, desc="search: half b"))
        if is_rank_zero():  # the score is in the state; the finalist's weights are not needed again
            shutil.rmtree(folder / "distill_ckpt", ignore_errors=True)
        return {**result, "tokens": last["tokens"]}


def write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def run_search(cfg: DictConfig, space: SearchSpace, profile: Profile, scorers: Scorers, run_dir: Path) -> dict:
    """Rank (objectives [kl]) or NSGA-II (several objectives); returns the report's search section, with the pick's
    target sizes under "target"."""
    s, started = cfg.search, time.perf_counter()
    n = space.dims["num_layers"]
    d = cfg.prune.depth
    space.layers_for = lambda keep: choose_layers(scorers.scores, n, keep, d.method, d.metric)["kept"]
    state = SearchState.load(run_dir / "search" / "state.json", scorers.fingerprint)
    barrier()  # every rank has read the state before rank zero writes it again
    before = len(state.pruned) + len(state.distilled)
    folder = run_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    objectives = tuple(s.objectives)
    section = {"profile": profile.markdown(), "space_size": space.size, "objectives": list(objectives),
               "bounds": profile.bounds}
    if len(objectives) == 1:
        candidates = space.candidates(profile.bounds)
        if not candidates:
            raise ConfigError("no candidate of the search grid fits every bound and a stock config; raise the bounds "
                              "or refine search.divisors.*")
        result = rank_candidates(candidates, s.top_k, s.finalists, state, scorers.pruned, scorers.distilled,
                                 deal=True)
        chosen = result.pop("pick")
        scored = result["scored"]
        section.update(result, candidates_within_budget=len(candidates))
    else:
        def kl(generation: list[Candidate]) -> list[float]:
            score_missing(generation, state.pruned, scorers.pruned, state, "pruned", deal=True)
            return [state.pruned[c.key]["kl"] for c in generation]

        evaluated = nsga2(space, profile.bounds, objectives, kl, s.population, s.generations, cfg.seed)
        if not evaluated:
            raise ConfigError(f"NSGA-II met no candidate within every bound in {s.generations} generations of "
                              f"{s.population}; raise the bounds or search.population / search.generations.")
        front = front_of(evaluated, objectives)
        chosen = pick(front, objectives, s.pick)
        if is_rank_zero():
            write_csv(folder / "front.csv", evaluated, front, chosen)
            plot_front(folder / "front.png", evaluated, front, chosen, objectives)
        scored = [{"key": c.key, **c.target, **c.costs, **{f"pruned_{k}": v for k, v in state.pruned[c.key].items()}}
                  for c in sorted(evaluated, key=lambda c: c.costs["kl"])]
        section.update(front=[c.key for c in front], pick_rule=s.pick, scored=scored, files=["search/front.csv",
                                                                                             "search/front.png"])
    if is_rank_zero():
        write_rows(run_dir / "search.csv", scored)
    seconds = time.perf_counter() - started
    new = len(state.pruned) + len(state.distilled) - before  # scores taken by this run (not read from the state)
    section.update(target=chosen.target, pick=chosen.key, pick_costs=chosen.costs, seconds=round(seconds, 2),
                   scores_taken=new, scores_per_minute=round(60 * new / max(seconds, 1e-9), 2),
                   latency_measured=space.latency.measured if space.latency else 0)
    log.info(f"search: picked {chosen.key} ({len(scored)} candidates scored in {seconds:.0f} s)")
    return section
