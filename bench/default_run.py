"""Usage: python bench/default_run.py [--out outputs/bench_default] [--name default_run] [override ...]

The README's first command end to end, as a user runs it: `python -m llmprune recipe=smollm2_minitron` (SmolLM2-135M
-> 84M, 100 distillation steps, embedded text, this CPU) in a child process under bench/_peak.py. Records the wall
time of the whole command, the time of each stage, the peak resident memory, and the held-out perplexities and KL
of the teacher, the pruned and the distilled model from the run's report.json, and a sha256 of final/'s weights (the
same code, settings and CPU kind give the same bytes: a change that should not alter results is checked by it). The
run directory is kept (--out): bench/gguf_runtime.py reads its final/. Writes bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, md_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_default", help="run directory (replaced)")
    parser.add_argument("--name", default="default_run", help="result file name under bench/results")
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    load_before = machine_info()["loadavg_1_5_15"]
    command = [sys.executable, str(ROOT / "bench" / "_peak.py"), "-m", "llmprune", "recipe=smollm2_minitron",
               f"output_dir={out}", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("__peak_rss_kb__"))
    report = json.loads((out / "report.json").read_text())
    ev, timings = report["eval"], report["timings_s"]
    rows = [[model, ev[key]["perplexity"], ev[key].get("kl_to_teacher") or 0.0] for model, key in
            (("teacher (134.5M)", "teacher"), ("pruned, before distillation", "pruned"),
             ("pruned + distilled (final/)", "final"))]
    params = report["params"]
    digest = hashlib.sha256()
    for shard in sorted((out / "final").glob("*.safetensors")):
        digest.update(shard.read_bytes())
    weights_sha256 = digest.hexdigest()
    markdown = "\n\n".join([
        "# The README's first command end to end: `python -m llmprune recipe=smollm2_minitron`",
        f"Wall time of the whole command: **{wall:.0f} s ({wall / 60:.1f} min)**; peak resident memory "
        f"{peak_kb / 2**20:.2f} GiB; parameters {params['before']:,} -> {params['after']:,}; "
        f"{report['distill'].get('steps')} distillation steps, {report['distill'].get('tokens', 0):,} tokens; "
        f"final/ weights sha256 {weights_sha256[:16]}. "
        f"Load average before the run: {load_before} (other work on the machine slows every stage).",
        md_table(["model", "held-out perplexity", "KL to teacher (nats/token)"], rows),
        "Time per stage (s):",
        md_table(["stage", "seconds"], [[k, v] for k, v in timings.items()]),
        f"Held-out text: {report['data']['heldout_tokens']:,} tokens of the embedded pydoc text that calibration and "
        f"distillation never read. Overrides: {extra or 'none'}. Run directory: {args.out}."])
    write_results(args.name, markdown, {"wall_s": wall, "peak_rss_gib": peak_kb / 2**20, "eval": ev,
                                        "final_weights_sha256": weights_sha256, "timings_s": timings,
                                        "params": params, "distill": report["distill"], "overrides": extra,
                                        "out": args.out, "loadavg_before": load_before})


if __name__ == "__main__":
    main()
