"""Usage: python bench/distill_speed.py [--part step|torchrun|all] [--rounds 3] [--torchrun-steps 6]

Distillation speed on SmolLM2-135M pruned to the default width target (hidden 448, FFN 1024), one step of
4 x 256 tokens with the default recipe's loss (forward KL), on the CPU:
  step      a training step of `llmprune.distill.train.train` against its parts measured alone on the same batch:
            student forward + backward (LM loss) and teacher forward, each computing the logits the step computes
            (the positions that predict a token). Efficiency = (parts) / step; target >= 0.9.
            Rounds interleave the three measurements so a change of load hits all of them.
  torchrun  tokens/s of `train` for the same global batch (8 x 256) in 1 process (2 threads, 2 accumulation
            steps) and in 2 processes under torchrun (gloo, 1 thread each, DDP), steps after the first.
Writes bench/results/distill_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, WIDTH_TARGET, machine_info, md_table, setup, write_results  # noqa: E402

from llmprune.allocator import keep_freed_memory  # noqa: E402
from llmprune.api import prune  # noqa: E402
from llmprune.config import DistillConfig  # noqa: E402
from llmprune.distill import losses  # noqa: E402
from llmprune.distill.train import Student, autocast_dtype, distill_loss, train  # noqa: E402
from llmprune.evaluate import predicting_positions  # noqa: E402

SEQ = 256


def distill_cfg(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(DistillConfig()), "lr": 3e-4, "warmup_steps": 2, "eval_every": 10**9,
                              "save_every": 10**9, "keep_checkpoints": 1, **changes})


def pruned_student(s, calib_samples: int = 32):
    student, _ = prune(s.model, export_config=WIDTH_TARGET, calib_data=s.splits.calib[:calib_samples], batch_size=4)
    return student.requires_grad_(True)  # a new model: s.model stays the teacher


def step_times(student, teacher, windows, steps: int, tmp: Path, micro: int = 4, global_batch: int = 4) -> list[float]:
    """Seconds of each of `steps` training steps (train()'s own per-step clock; the first is a warm-up)."""
    cfg = distill_cfg(max_steps=steps, micro_batch_size=micro, global_batch_size=global_batch)
    tmp.mkdir(parents=True, exist_ok=True)
    rows = train(Student(student), windows, distill_loss(teacher, cfg, ()), cfg, tmp, "distill", str(time.time()))
    clock = [0.0] + [r["seconds"] for r in rows]
    return [b - a for a, b in zip(clock, clock[1:])]


def part_step(s, rounds: int) -> dict:
    teacher = s.model.requires_grad_(False)
    student = pruned_student(s)
    ids = s.splits.train[:4]  # (4, 256)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext

    def student_fwd_bwd():
        student.zero_grad(set_to_none=True)
        with autocast():
            logits = student(input_ids=ids, use_cache=False, logits_to_keep=predicting_positions(ids)).logits
            loss = losses.lm_loss(logits, ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.float32))
        loss.backward()

    def teacher_fwd():
        with torch.no_grad(), autocast():
            teacher(input_ids=ids, use_cache=False, logits_to_keep=predicting_positions(ids))

    def timed(fn, n=3):
        out = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    keep_freed_memory()  # what train() sets up on the CPU, so the parts run with the same allocator
    student_fwd_bwd(), teacher_fwd()  # warm-up
    parts = {"student": [], "teacher": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            parts["student"] += timed(student_fwd_bwd)
            parts["teacher"] += timed(teacher_fwd)
            # a fresh run each round (first step = warm-up); every step trains on 4 windows like `ids`
            parts["step"] += step_times(copy.deepcopy(student), teacher, s.splits.train, 4, Path(tmp) / f"r{r}")[1:]
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in
                                                          parts.items()), flush=True)
    med = {k: statistics.median(v) for k, v in parts.items()}
    return {"autocast": str(dtype) if dtype else "fp32", "median_s": med, "all_s": parts,
            "efficiency": (med["student"] + med["teacher"]) / med["step"]}


def torchrun_worker(steps: int, out: Path) -> None:
    """One rank of the torchrun measurement (or the single process)."""
    from llmprune.distributed import is_rank_zero, world_size

    s = setup(num_samples=4, eval_samples=1)
    student = pruned_student(s, calib_samples=4)
    run_dir = out.parent / f"run{world_size()}"  # shared by the ranks (checkpoints are collective)
    times = step_times(student, s.model.requires_grad_(False), s.splits.train, steps, run_dir, micro=4,
                       global_batch=8)
    if is_rank_zero():
        out.write_text(json.dumps({"world_size": world_size(), "threads": torch.get_num_threads(),
                                   "step_s": times}))


def part_torchrun(steps: int) -> dict:
    results = {}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in (("1 process", [sys.executable]),
                               ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node=2"])):
            out = Path(tmp) / "result.json"
            subprocess.run([*launcher, __file__, "--worker", str(out), "--torchrun-steps", str(steps)], env=env,
                           check=True)
            r = json.loads(out.read_text())
            step = statistics.median(r["step_s"][1:])
            results[name] = {**r, "median_step_s": step, "tokens_per_s": 8 * SEQ / step}
            print(name, results[name], flush=True)
    results["speedup"] = results["2 processes"]["tokens_per_s"] / results["1 process"]["tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=("step", "torchrun", "all"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torchrun-steps", type=int, default=6)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            torch.distributed.init_process_group("gloo")
        torchrun_worker(args.torchrun_steps, Path(args.worker))
        return
    out_json = RESULTS / "distill_speed.json"
    payload = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.part in ("step", "all"):
        s = setup(eval_samples=1)
        payload["step"] = part_step(s, args.rounds)
        payload["step"]["machine"] = machine_info()
        del s
    if args.part in ("torchrun", "all"):
        payload["torchrun"] = part_torchrun(args.torchrun_steps)
        payload["torchrun"]["machine"] = machine_info()
    lines = ["## Distillation speed: SmolLM2-135M -> hidden 448 / FFN 1024, 4 x 256 tokens a step, CPU", ""]
    if "step" in payload:
        st = payload["step"]
        m = st["median_s"]
        lines += [f"(a) One training step against its parts, median of {len(st['all_s']['step'])} (autocast: "
                  f"{st['autocast']}; load average {st['machine']['loadavg_1_5_15']}):", "",
                  md_table(["measurement", "median s"], [
                      ["student forward + backward (LM loss)", m["student"]], ["teacher forward", m["teacher"]],
                      ["sum of the parts", m["student"] + m["teacher"]],
                      ["distillation step (`train`: both, forward-KL loss, clipping, AdamW)", m["step"]]]), "",
                  f"Efficiency (parts / step): **{st['efficiency']:.2f}** (target >= 0.9: "
                  f"{'met' if st['efficiency'] >= 0.9 else 'missed'}).", ""]
    if "torchrun" in payload:
        tr = payload["torchrun"]
        lines += ["(b) Same global batch (8 x 256 tokens a step), DDP over gloo:", "",
                  md_table(["run", "threads per process", "median s/step", "tokens/s"], [
                      [k, tr[k]["threads"], tr[k]["median_step_s"], tr[k]["tokens_per_s"]]
                      for k in ("1 process", "2 processes")]), "",
                  f"2 processes / 1 process throughput: **{tr['speedup']:.2f}x** (load average "
                  f"{tr['machine']['loadavg_1_5_15']}).", ""]
    write_results("distill_speed", "\n".join(lines), payload)


if __name__ == "__main__":
    main()
