"""Usage: python bench/memory_default.py [--short] [--name NAME] [override ...]

Peak resident memory (RSS) of the default recipe, `python -m llmprune recipe=smollm2_minitron`, end to end on the
CPU, and where it goes. The recipe runs in a child process, so the peak is the recipe's own. The child reads the
kernel's peak-RSS counter (VmHWM in /proc/self/status) at every boundary and resets it (`/proc/self/clear_refs`), so
each stage gets its own peak: load, data, calibrate, plan, prune, evaluate_pruned, export_pruned, distill,
export_final, and inside distill the training steps, the held-out evaluations and the checkpoint writes. A thread
samples RSS twice a second as a cross-check, and every 20 ms the bytes malloc has handed out and not taken back
(glibc's mallinfo2: tensors and other live allocations), whose peak per phase set against the RSS peak shows what
the allocator holds beyond live memory.

Breakdown: teacher and student weights, gradients and AdamW state are their tensor sizes; the tensors autograd keeps
for backward are measured on the first micro-batch (`torch.autograd.graph.saved_tensors_hooks`, distinct storages,
parameters excluded), split into those with the vocabulary as last dimension (logits, log-probabilities) and the
rest (the student's activations); "runtime" is the RSS after the imports. What the step's peak holds beyond those
is temporaries alive at the peak plus freed memory the allocator keeps
(`llmprune.allocator.keep_freed_memory`). The child runs the pipeline in its own process, so under the system
allocator (glibc's malloc, whose mallinfo2 the sampler reads), not the jemalloc `python -m llmprune` preloads where it
is installed (bench/results/allocator.md compares the two).

--short  distill.max_steps=10 distill.eval_every=5 distill.save_every=5 (every stage and phase at least twice;
         ~15 min on 2 loaded cores instead of ~1 h), written to bench/results/memory_default_short.{md,json}.
Further arguments are recipe overrides (`key=value`). The full run writes bench/results/memory_default.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2_minitron"
SHORT = ["distill.max_steps=10", "distill.eval_every=5", "distill.save_every=5"]
GB = 1024**3


def proc_status(key: str) -> float:
    """A /proc/self/status field in GiB (VmRSS: now, VmHWM: peak since start or the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GB
    raise KeyError(key)


class PhaseMeter:
    """Peak RSS per phase: at each boundary the kernel's peak counter is read into the phase that ends and reset.

    Phases nest (distill -> evaluate): entering a sub-phase closes the running part of its parent, leaving resumes it;
    a phase entered several times keeps its largest peak and the RSS at its first entry.
    """

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.rss_at_start: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.stack: list[str] = []
        self.can_reset = self._reset()
        self.samples: list[tuple[float, float, str]] = []
        self.allocated: dict[str, float] = {}  # sampled peak of live malloc bytes per phase
        self._mallinfo = _mallinfo2()
        self._started = time.perf_counter()
        self._stop = threading.Event()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS counter to the current RSS
            return True
        except OSError:
            return False

    def _close(self) -> None:
        if self.stack:
            name = self.stack[-1]
            self.peaks[name] = max(self.peaks.get(name, 0.0), proc_status("VmHWM"))
        self._reset()

    def enter(self, name: str) -> None:
        self._close()
        self.stack.append(name)
        self.rss_at_start.setdefault(name, proc_status("VmRSS"))
        self.counts[name] = self.counts.get(name, 0) + 1

    def leave(self) -> None:
        self._close()
        self.stack.pop()

    def switch(self, name: str) -> None:
        """Close the running top-level stage and open `name`."""
        while self.stack:
            self.leave()
        self.enter(name)

    @contextmanager
    def phase(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def sample_forever(self, every_s: float = 0.5, allocated_every_s: float = 0.02) -> None:
        last = 0.0
        while not self._stop.wait(allocated_every_s):
            name = self.stack[-1] if self.stack else ""
            if self._mallinfo is not None:
                info = self._mallinfo()
                live = (info.uordblks + info.hblkhd) / GB
                self.allocated[name] = max(self.allocated.get(name, 0.0), live)
            now = time.perf_counter() - self._started
            if now - last >= every_s:
                last = now
                self.samples.append((round(now, 1), round(proc_status("VmRSS"), 3), name))

    def stop(self) -> None:
        self._stop.set()
        while self.stack:
            self.leave()


def _mallinfo2():
    """glibc's mallinfo2 as a callable (None elsewhere): uordblks + hblkhd are the bytes in use."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = MallInfo2
    return function


def saved_for_backward(compute_loss, module, ids, vocab: int, recomputed: bool) -> tuple[float, float, float]:
    """(GiB with a vocabulary-sized dimension, other GiB, compute_loss's result): the distinct storages autograd
    keeps for backward on one batch (with `recomputed`, those `llmprune.distill.recompute` does not replace by a
    recipe, as the training step's own hooks would)."""
    import torch

    from llmprune.distill import recompute

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        recipe = recompute.recipe(t) if recomputed else None
        if recipe is not None:
            return recipe
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[storage.data_ptr()] = (storage.nbytes(), vocab in t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, recompute.Unpacker()):
        out = compute_loss(module, ids)
    vocab_sized = sum(n for n, v in seen.values() if v) / GB
    other = sum(n for n, v in seen.values() if not v) / GB
    return vocab_sized, other, out


def child(out_path: Path, overrides: list[str]) -> None:
    """Run the recipe in this process with the meter attached; write what it measured to out_path."""
    meter = PhaseMeter()
    meter.enter("startup")
    import logging

    import torch

    import llmprune.distill.train as distill_mod
    import llmprune.stages.distillation as stage
    from llmprune.__main__ import main as llmprune_main
    from llmprune.progress import setup_logging

    runtime = proc_status("VmRSS")
    sampler = threading.Thread(target=meter.sample_forever, daemon=True)
    sampler.start()
    info: dict = {"runtime_gb": runtime}

    class StageHandler(logging.Handler):  # pipeline.Timings logs "stage: <name>" as each stage starts
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("stage: "):
                meter.switch(message.split(": ", 1)[1])

    setup_logging()  # the pipeline's console handler first (it adds one only where the logger has none)
    logging.getLogger("llmprune").addHandler(StageHandler())

    # label the phases inside distillation; the wrapped package functions run unchanged
    real_evaluate, real_save, real_train = stage.evaluate, distill_mod.save_checkpoint, stage.train

    def evaluate(*args, **kwargs):
        if meter.stack and meter.stack[-1].startswith("distill"):
            with meter.phase("distill: evaluate"):
                return real_evaluate(*args, **kwargs)
        return real_evaluate(*args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        with meter.phase("distill: checkpoint"):
            return real_save(*args, **kwargs)

    def train(module, windows, compute_loss, cfg, *args, **kwargs):
        trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        info.update(student_gb=sum(p.numel() * p.element_size() for p in module.parameters()) / GB,
                    gradients_gb=trainable / GB, adamw_state_gb=2 * trainable / GB,
                    micro_batch=cfg.micro_batch_size, seq_len=windows.shape[1])
        first = []

        def measured(m, ids):
            if first:
                return compute_loss(m, ids)
            first.append(True)
            vocab = m.module.model.config.vocab_size if hasattr(m, "module") else m.model.config.vocab_size
            vocab_sized, other, out = saved_for_backward(compute_loss, m, ids, vocab, cfg.recompute_products)
            info.update(saved_vocab_sized_gb=vocab_sized, saved_activations_gb=other, vocab=vocab,
                        logits_gb=ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 / GB)
            return out

        with meter.phase("distill: steps"):
            return real_train(module, windows, measured, cfg, *args, **kwargs)

    stage.evaluate, distill_mod.save_checkpoint, stage.train = evaluate, save_checkpoint, train
    started = time.perf_counter()
    code = llmprune_main([f"recipe={RECIPE}", *overrides])
    seconds = time.perf_counter() - started
    meter.stop()
    teacher_params = None
    report_path = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))) / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        teacher_params = report["params"]["before"]
        info.update(report_timings_s=report["timings_s"], seconds_per_step=report["distill"].get("seconds_per_step"),
                    params=report["params"], eval=report["eval"])
        metrics = Path(report["output_dir"]) / "distill_metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            clock = [0.0] + [r["seconds"] for r in rows]
            evaluated = {r["step"] for r in rows if "eval_perplexity" in r}
            info["step_s"] = [round(b - a, 2) for a, b, r in zip(clock, clock[1:], rows)
                              if r["step"] not in evaluated]
            info["final_loss"] = rows[-1]["loss"]
    info["teacher_gb"] = teacher_params * 4 / GB if teacher_params else None
    result = {"exit_code": code, "seconds": round(seconds, 1), "can_reset_peak": meter.can_reset,
              "peak_gb": max(meter.peaks.values()), "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
              * 1024 / GB, "sampled_peak_gb": max((s[1] for s in meter.samples), default=None),
              "phases": [{"phase": k, "rss_at_start_gb": meter.rss_at_start[k], "peak_gb": meter.peaks[k],
                          "allocated_peak_gb": meter.allocated.get(k), "times": meter.counts[k]}
                         for k in meter.peaks],
              "breakdown": info, "torch": torch.__version__,
              "autocast": str(distill_mod.autocast_dtype("auto", torch.device("cpu")) or "fp32"),
              "samples": meter.samples}
    out_path.write_text(json.dumps(result, indent=1))


def git_commit() -> str:
    """HEAD's short hash, with -dirty when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")


def breakdown_rows(b: dict, step_peak: float) -> list[list]:
    rows = [["runtime (Python, torch, transformers; RSS after the imports)", b["runtime_gb"]],
            ["teacher weights (fp32)", b.get("teacher_gb")],
            ["student weights", b.get("student_gb")],
            ["student gradients", b.get("gradients_gb")],
            ["AdamW state (exp_avg, exp_avg_sq)", b.get("adamw_state_gb")],
            ["saved for backward: student activations", b.get("saved_activations_gb")],
            ["saved for backward: vocabulary-sized (logits, log-probs, LM-head gradient)",
             b.get("saved_vocab_sized_gb")]]
    known = sum(v for _, v in rows if v is not None)
    rows.append(["sum of the above", known])
    rows.append(["peak of the training steps (measured)", step_peak])
    rows.append(["rest: the output layer's gradient and loss temporaries at the peak, shared libraries, freed memory "
                 "the allocator keeps", step_peak - known])
    return [[k, "-" if v is None else round(v, 3)] for k, v in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="10 distillation steps, eval and save every 5")
    parser.add_argument("--name", help="results file name (default memory_default[_short])")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        child(Path(args.child), overrides)
        return
    from _common import md_table, write_results

    settings = [*(SHORT if args.short else []), *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        command = [sys.executable, __file__, "--child", str(out), f"output_dir={Path(tmp) / 'run'}", *settings]
        subprocess.run(command, env=env, check=True)
        r = json.loads(out.read_text())
    b = r["breakdown"]
    phases = {p["phase"]: p for p in r["phases"]}
    step_peak = phases.get("distill: steps", {}).get("peak_gb", float("nan"))
    name = args.name or ("memory_default_short" if args.short else "memory_default")
    steps = b.get("step_s", [])
    lines = [f"## Peak RSS of `python -m llmprune recipe={RECIPE} {' '.join(settings)}`".rstrip(), "",
             f"Peak RSS **{r['peak_gb']:.2f} GiB** ({r['peak_gb'] * GB / 1e9:.2f} GB; sampled every 0.5 s: "
             f"{r['sampled_peak_gb']:.2f} GiB); "
             f"{r['seconds']:.0f} s in all, autocast {r['autocast']}, torch {r['torch']}; median step "
             f"{sorted(steps)[len(steps) // 2] if steps else float('nan'):.2f} s over {len(steps)} steps without "
             f"evaluation (final training loss {b.get('final_loss', float('nan')):.4f}).", "",
             "Per stage (the peak counter is reset at each boundary; \"allocated\" is what malloc has handed out, "
             "sampled every 20 ms, so a peak shorter than that can be missed; `distill` is the stage outside "
             "`train`'s steps, evaluations and checkpoints):", "",
             md_table(["stage", "RSS at start (GiB)", "RSS peak (GiB)", "allocated peak (GiB, sampled)", "times"],
                      [[p["phase"], round(p["rss_at_start_gb"], 3), round(p["peak_gb"], 3),
                        "-" if p.get("allocated_peak_gb") is None else round(p["allocated_peak_gb"], 3), p["times"]]
                       for p in r["phases"]]), "",
             f"Where the training step's memory goes (micro batch {b.get('micro_batch')} x seq {b.get('seq_len')}, "
             f"vocabulary {b.get('vocab')}: one fp32 logits tensor of the positions that predict a token is "
             f"{b.get('logits_gb', float('nan')):.3f} GiB):", "",
             md_table(["part", "GiB"], breakdown_rows(b, step_peak))]
    if not r["can_reset_peak"]:
        lines += ["", "(/proc/self/clear_refs was not writable: every peak is the process's peak so far.)"]
    payload = {k: v for k, v in r.items() if k != "samples"}
    payload["rss_samples"] = r["samples"][:: max(1, len(r["samples"]) // 400)]  # at most ~400 points
    payload["command"] = f"python -m llmprune recipe={RECIPE} " + " ".join(settings)
    payload["commit"] = git_commit()
    write_results(name, "\n".join(lines), payload)


if __name__ == "__main__":
    main()
