"""Shared by the bench scripts: the model, the fixed calibration / held-out split, timing and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH_TARGET = {"hidden_size": 448, "ffn_hidden_size": 1024}  # the default recipe's width target


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    adapter: object
    splits: text.TextSplits
    calib: list[text.Batch]  # the default recipe's calibration batches (head of the stream)
    heldout: list[text.Batch]  # fixed held-out batches (tail of the stream), never seen by calibration
    load_s: float


def setup(model_path: str = "embedded:smollm2", seq_len: int = 256, num_samples: int = 32, eval_samples: int = 32,
          eval_fraction: float = 0.1, batch_size: int = 4, seed: int = 0) -> Setup:
    """Load the model and cut the embedded text the way the default recipe does (data.* defaults)."""
    start = time.perf_counter()
    model, tokenizer, _ = load_model(model_path, device="cpu")
    load_s = time.perf_counter() - start
    stream = text.token_stream(text.embedded_documents(), tokenizer)
    splits = text.split_stream(stream, seq_len, num_samples, eval_samples, eval_fraction, seed)
    return Setup(model, tokenizer, get_adapter(model), splits, text.to_batches(splits.calib, batch_size),
                 text.to_batches(splits.heldout, batch_size), load_s)


class CachedTeacher:
    """Stands in for the teacher in `llmprune.evaluate.evaluate(..., teacher=)`: the first call on a batch runs the
    model and keeps its logits, later calls on the same token ids return them. Evaluating many students against
    one teacher on a fixed held-out set then costs one teacher pass in all (KL values are unchanged)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: dict[bytes, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        key = input_ids.cpu().numpy().tobytes() + (b"" if attention_mask is None else
                                                   attention_mask.cpu().numpy().tobytes())
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return SimpleNamespace(logits=self.cache[key])


def data_info(s: Setup) -> dict:
    return {"stream_tokens": s.splits.stream_tokens, "calib_region_tokens": s.splits.calib_region_tokens,
            "calib_samples": list(s.splits.calib.shape), "heldout_samples": list(s.splits.heldout.shape)}


def machine_info() -> dict:
    """What a number depends on besides the code: versions, cores, load, and the CPU's native bf16 (the default
    recipe distills under bf16 autocast there and in float32 elsewhere: other memory, speed and results) and the
    jemalloc library `python -m llmprune` would preload (llmprune/allocator.py)."""
    import transformers

    from llmprune.allocator import find_jemalloc
    from llmprune.distill.train import cpu_has_bf16

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_1_5_15": [round(x, 2) for x in load] if load else None,
            "processor": platform.processor() or platform.machine(), "cpu_bf16": cpu_has_bf16(),
            "jemalloc": find_jemalloc()}


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    """Median / min / all wall times (s) of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": [round(t, 4) for t in times]}


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance() -> dict:
    """The commit (with a flag when the tree had uncommitted changes) and the command that produced a result."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_changes": bool(git("status", "--porcelain")),
            "command": " ".join(["python", str(shown), *sys.argv[1:]])}


def write_results(name: str, markdown: str, payload: dict) -> None:
    """bench/results/{name}.md and .json (the commit and command that made them last: a reloaded payload never
    overrides them); print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine_info(), **provenance()}
    m = payload["machine"]
    markdown += (f"\n\n_{payload['command']} at commit {str(payload['commit'])[:10]}; {m['cpus']} CPUs, native bf16: "
                 f"{'yes' if m['cpu_bf16'] else 'no'}, jemalloc: {'yes' if m['jemalloc'] else 'no'}, torch "
                 f"{m['torch']}, transformers {m['transformers']}_")
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"\nwrote {RESULTS / (name + '.md')} and .json")
