"""Measured latency of a candidate shape on the device the run is on, never estimated.

Latency depends on the shape only, not on which channels were kept, so a model of the candidate's config with
random weights is timed: one prefill of `batch_size` x `seq_len` tokens (the LM head on the last position only, as
generation computes it), the median of `repeats` runs after one warm-up. Measurements are cached per shape in
`search/latency.json` of the run directory, under the device, dtype and input size they were taken at; a re-run
(or a resumed search) times nothing it already has.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from llmprune.distributed import all_reduce_sum, is_rank_zero
from llmprune.plan import PruningPlan
from llmprune.pruning.apply import pruned_config
from llmprune.search.space import Candidate

log = logging.getLogger("llmprune")


class LatencyMeter:
    """Candidate -> median prefill seconds, cached in `path`.

    Args:
        model: the unpruned model (its class, config, dtype and device are used; its weights are not touched).
        adapter: its adapter (rewrites the config to a candidate's shape).
        batch_size / seq_len: the timed input.
        repeats: timed runs per shape (the median is kept).
        path: the JSON cache (None: kept in memory only, as the Python API does).
    """

    def __init__(self, model: torch.nn.Module, adapter, batch_size: int, seq_len: int, repeats: int,
                 path: Path | None):
        self.model, self.adapter, self.repeats, self.path = model, adapter, repeats, path
        self.param = next(model.parameters())
        self.shape = (batch_size, seq_len)
        self.setting = f"{self.param.device}|{self.param.dtype}|batch {batch_size}|seq {seq_len}"
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

    @torch.no_grad()
    def time(self, model: torch.nn.Module) -> float:
        """Median seconds of one prefill."""
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, self.shape, device=self.param.device)
        runs = []
        for i in range(self.repeats + 1):
            if self.param.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if self.param.device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run warms up kernels and allocators
                runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    def __call__(self, c: Candidate) -> float:
        if c.key not in self.seconds:
            seconds = self.time(self.random_model(c)) if is_rank_zero() else 0.0
            # rank zero's timing on every rank, so every rank keeps the same candidates
            total = all_reduce_sum(torch.tensor([seconds], dtype=torch.float64, device=self.param.device))
            self.seconds[c.key] = total.item()
            self.measured += 1
            self._save()
        return self.seconds[c.key]
