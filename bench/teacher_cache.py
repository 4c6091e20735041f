"""Usage: python bench/teacher_cache.py [--steps 6] [override ...]

Distillation from cached teacher logits (distill.teacher_cache=true) against the live teacher, on the default recipe
(`python -m llmprune recipe=smollm2_minitron`, SmolLM2-135M -> 84M on the CPU), both with the same loss (top-64 KL,
so the two runs train the same student the same way). Each run is a child process under bench/_peak.py, which
samples its resident memory per pipeline stage. Reported: the cache's size on disk and build time, the training
step time (steps after the first, from distill_metrics.jsonl; evaluation and checkpoints only after the last step),
and the peak RSS of the distill stage (with the cache the teacher is released before it).
Writes bench/results/teacher_cache.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSS = ["distill.kl_weight=0", "distill.topk_weight=1", "distill.topk=64"]


def run(out: Path, steps: int, cached: bool, extra: list[str]) -> dict:
    """One recipe run in a child process: its report, step time and per-stage peak RSS (GiB)."""
    overrides = [f"output_dir={out}", f"distill.max_steps={steps}", f"distill.eval_every={steps}",
                 f"distill.save_every={steps}", *LOSS, f"distill.teacher_cache={str(cached).lower()}", *extra]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "_peak.py"), "-m", "llmprune",
                           "recipe=smollm2_minitron", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "LLMPRUNE_STAGE_PEAKS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = {line.split()[1]: int(line.split()[2]) / 2**20 for line in done.stderr.splitlines()
             if line.startswith("__stage_peak_kb__")}
    report = json.loads((out / "report.json").read_text())
    seconds = [json.loads(line)["seconds"] for line in (out / "distill_metrics.jsonl").read_text().splitlines()]
    return {"step_s": (seconds[-1] - seconds[0]) / max(1, len(seconds) - 1), "distill_peak_gib": peaks["distill"],
            "cache": report["distill"].get("teacher_cache"), "timings_s": report["timings_s"],
            "final_perplexity": report["eval"].get("final", {}).get("perplexity")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        live = run(Path(tmp) / "live", args.steps, False, extra)
        cached = run(Path(tmp) / "cached", args.steps, True, extra)
    cache = cached["cache"]
    rows = [["live teacher", "-", "-", live["step_s"], live["distill_peak_gib"], live["final_perplexity"]],
            ["teacher_cache", f"{cache['bytes'] / 2**20:.1f} MiB ({cache['windows']} windows)",
             cached["timings_s"]["teacher_cache"], cached["step_s"], cached["distill_peak_gib"],
             cached["final_perplexity"]]]
    markdown = (f"# Distillation from cached top-64 teacher logits vs the live teacher ({args.steps} steps)\n\n"
                + md_table(["teacher", "cache size", "cache build (s)", "step (s)", "distill peak RSS (GiB)",
                            "final perplexity"], rows))
    write_results("teacher_cache", markdown, {"steps": args.steps, "live": live, "cached": cached})


if __name__ == "__main__":
    main()
