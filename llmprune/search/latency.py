"""Measured latency of a candidate shape on the device the run is on, never estimated.

Latency depends on the shape only, not on which channels were kept, so a model of the candidate's config with
random weights is timed: one prefill of `batch_size` x `seq_len` tokens (the LM head on the last position only, as
generation computes it). The shapes asked for together are timed in groups whose weights add up to at most twice
the unpruned model's: after one warm-up each, the group's models run in turn `repeats` times and each keeps its
fastest run. Load from other processes only ever slows a run, so the minimum is the estimate least moved by it, and
taking turns spreads each shape's runs over time, so a burst of load meets one run of each shape rather than all
runs of one (a burst on a shared machine once made a shape time 50x its real latency when its runs came back to
back). Measurements are cached per shape in `search/latency.json` of the run directory, under the device, dtype
and input size they were taken at; a re-run (or a resumed search) times nothing it already has.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from llmprune.distributed import all_reduce_sum, is_rank_zero
from llmprune.plan import PruningPlan
from llmprune.pruning.apply import pruned_config
from llmprune.search.space import Candidate

log = logging.getLogger("llmprune")


class LatencyMeter:
    """Candidates -> their prefill seconds (the fastest of `repeats` runs), cached in `path`.

    Args:
        model: the unpruned model (its class, config, dtype and device are used; its weights are not touched).
        adapter: its adapter (rewrites the config to a candidate's shape).
        batch_size / seq_len: the timed input.
        repeats: timed runs per shape (the fastest counts).
        path: the JSON cache (None: kept in memory only, as the Python API does).
    """

    def __init__(self, model: torch.nn.Module, adapter, batch_size: int, seq_len: int, repeats: int,
                 path: Path | None):
        self.model, self.adapter, self.repeats, self.path = model, adapter, repeats, path
        self.param = next(model.parameters())
        self.shape = (batch_size, seq_len)
        self.setting = f"{self.param.device}|{self.param.dtype}|batch {batch_size}|seq {seq_len}"
        self.group_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
        self.seconds = self._load()
        self.measured = 0  # shapes timed by this meter (not read from the cache)

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("setting") != self.setting:
            log.info(f"search: {self.path} was measured at {data.get('setting')}; timing again at {self.setting}")
            return {}
        return data["seconds"]

    def _save(self) -> None:
        if self.path is not None and is_rank_zero():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"setting": self.setting, "seconds": self.seconds}, indent=1))
            tmp.replace(self.path)

    def random_model(self, c: Candidate) -> torch.nn.Module:
        """A model of the candidate's shape with random weights, on the teacher's device and dtype."""
        dims = self.adapter.dims()
        plan = PruningPlan(self.adapter.family, dict(dims), {**dims, **c.target}, list(c.kept_layers))
        config = pruned_config(self.adapter, plan)
        with torch.device(self.param.device):
            return type(self.model)._from_config(config, dtype=self.param.dtype).eval()

    def _run(self, model: torch.nn.Module, ids: torch.Tensor) -> float:
        """Seconds of one prefill."""
        if self.param.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if self.param.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    @torch.no_grad()
    def time(self, models: list[torch.nn.Module]) -> list[float]:
        """Each model's fastest prefill: one warm-up run each (kernels, allocator), then `repeats` rounds in turn."""
        ids = torch.randint(0, self.model.config.vocab_size, self.shape, device=self.param.device)
        for model in models:
            self._run(model, ids)
        runs = [[self._run(model, ids) for model in models] for _ in range(self.repeats)]
        return [min(column) for column in zip(*runs)]

    def groups(self, todo: list[Candidate]) -> list[list[Candidate]]:
        """`todo` cut into runs of shapes whose parameters (at the model's dtype) add up to at most group_bytes."""
        size = self.param.element_size()
        groups: list[list[Candidate]] = []
        used = 0
        for c in todo:
            need = c.costs["params"] * size if "params" in c.costs else self.group_bytes
            if not groups or used + need > self.group_bytes:
                groups.append([])
                used = 0
            groups[-1].append(c)
            used += need
        return groups

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        """Seconds of each candidate's shape, timing only the shapes not measured yet (once each)."""
        todo = list({c.key: c for c in candidates if c.key not in self.seconds}.values())
        for group in self.groups(todo):
            seconds = self.time([self.random_model(c) for c in group]) if is_rank_zero() else [0.0] * len(group)
            # rank zero's timings on every rank, so every rank keeps the same candidates
            total = all_reduce_sum(torch.tensor(seconds, dtype=torch.float64, device=self.param.device))
            self.seconds.update({c.key: value for c, value in zip(group, total.tolist(), strict=True)})
            self.measured += len(group)
            self._save()
        return [self.seconds[c.key] for c in candidates]
