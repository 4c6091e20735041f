"""Usage: python bench/step_ab.py --vary KEY=V1,V2[,...] [--name NAME] [--rounds 2] [--steps 10] [override ...]

Does a setting change the speed of a distillation step and the peak memory of the default recipe? The README's first
command, `python -m llmprune recipe=smollm2_minitron`, runs in a child process (bench/_peak.py) with
distill.max_steps=STEPS and KEY=V for each value V, the values taking turns round after round, so that a change of
load on the machine hits every value instead of one. Each run has its own output directory (nothing is resumed). A
step's time is the difference of consecutive `seconds` in the run's distill_metrics.jsonl
(`llmprune.distill.train.train` writes it after each optimizer step); the first step (page faults, warm-up) and the
steps that end with an evaluation or a checkpoint (the last one does) are left out. Also recorded: each run's peak
resident memory (the whole command) and its final training loss.

  --vary distill.micro_batch_size=1,2,4 --name micro_batch          (global batch 4: the same trajectory)
  --vary distill.recompute_products=false,true --name recompute_products
  --vary env:LLMPRUNE_ALLOCATOR=system,jemalloc --name allocator       (an environment variable: env:NAME)

Writes bench/results/NAME.{md,json} (NAME defaults to the key's last part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, md_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_times(rows: list[dict], eval_every: int, save_every: int) -> list[float]:
    """Seconds of each optimizer step but the first and those that end with an evaluation or a checkpoint (the
    last step always does)."""
    times = []
    for before, row in zip(rows, rows[1:-1]):
        step = row["step"]
        if step % eval_every and step % save_every:
            times.append(row["seconds"] - before["seconds"])
    return times


def run_once(setting: str, steps: int, extra: list[str], out: Path) -> dict:
    """One run with `setting`: a recipe override KEY=V, or env:NAME=V, an environment variable."""
    eval_every = save_every = 10**6  # only the end of the run evaluates and saves
    env = dict(os.environ)
    if setting.startswith("env:"):
        name, _, value = setting[4:].partition("=")
        env[name] = value
    command = [sys.executable, str(ROOT / "bench" / "_peak.py"), "-m", "llmprune", "recipe=smollm2_minitron",
               f"output_dir={out}", f"distill.max_steps={steps}", f"distill.eval_every={eval_every}",
               f"distill.save_every={save_every}", *extra, *([] if setting.startswith("env:") else [setting])]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("__peak_rss_kb__"))
    rows = [json.loads(line) for line in (out / "distill_metrics.jsonl").read_text().splitlines()]
    times = step_times(rows, eval_every, save_every)
    return {"setting": setting, "wall_s": round(wall, 1), "peak_gib": round(peak_kb / 2**20, 3),
            "step_s": [round(t, 3) for t in times], "median_step_s": round(statistics.median(times), 3),
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vary", required=True,
                        help="KEY=V1,V2,... or env:NAME=V1,V2,...: the setting and its values, in turns")
    parser.add_argument("--name", help="result file name (default: the key's last part)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    args, extra = parser.parse_known_args()
    key, _, values = args.vary.partition("=")
    settings = [f"{key}={v}" for v in values.split(",")]
    load_before = machine_info()["loadavg_1_5_15"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="llmprune_ab_") as tmp:
        for r in range(args.rounds):
            for i, setting in enumerate(settings):
                out = Path(tmp) / f"v{i}_r{r}"
                runs.append({"round": r, **run_once(setting, args.steps, extra, out)})
                shutil.rmtree(out, ignore_errors=True)
                print(json.dumps(runs[-1]), flush=True)
    rows, summary = [], {}
    for setting in settings:
        mine = [run for run in runs if run["setting"] == setting]
        every = [t for run in mine for t in run["step_s"]]
        summary[setting] = {"median_step_s": statistics.median(every), "min_step_s": min(every),
                            "peak_gib": max(run["peak_gib"] for run in mine)}
        rows.append([f"`{setting}`", len(every), summary[setting]["median_step_s"], summary[setting]["min_step_s"],
                     ", ".join(f"{run['median_step_s']:.2f}" for run in mine),
                     ", ".join(f"{run['peak_gib']:.3f}" for run in mine),
                     ", ".join(f"{run['final_loss']:.6f}" for run in mine)])
    base = summary[settings[-1]]["median_step_s"]
    markdown = "\n\n".join([
        f"## Distillation step time and peak memory by `{key}`: `python -m llmprune recipe=smollm2_minitron`",
        f"{args.rounds} rounds of {args.steps} steps per value, values in turns; step times leave out each run's first "
        f"and last step (load average before: {load_before}, after: {machine_info()['loadavg_1_5_15']}). "
        f"Overrides: {' '.join(extra) or 'none'}.",
        md_table(["setting", "steps timed", "median s/step", "fastest s/step", "median per run",
                  "peak RSS per run (GiB)", "final training loss per run"], rows),
        f"Median step time against `{settings[-1]}`: " + ", ".join(
            f"`{s}` {summary[s]['median_step_s'] / base:.3f}x" for s in settings) + ".",
    ])
    write_results(args.name or key.rsplit(".", 1)[-1], markdown,
                  {"runs": runs, "summary": summary, "steps": args.steps, "rounds": args.rounds,
                   "overrides": extra, "load_before": load_before})


if __name__ == "__main__":
    main()
