"""Usage: python bench/search_quality.py [--part budget|latency|all] [--out outputs/bench_search]

The Minitron architecture search on SmolLM2-135M-Instruct against the default recipe's hand-picked target.

  budget:  recipe smollm2_minitron_search (84.0M parameters; top 10 by pruned KL, 3 finalists distilled 16K tokens
           each), then the pick distilled with the default recipe's budget (100 steps x 4 x 256 tokens), against
           recipe smollm2_minitron (hidden 448 / FFN 1024) with the same distillation. Reports held-out perplexity
           and KL after distillation, the search wall time, scores per minute, the score's noise (two disjoint
           held-out halves) and the rank correlation of the pruned-only and distilled rankings of the finalists.
  latency: search.objectives=[kl, latency] under a prefill-latency budget of 70% on this CPU (batch 1 x 256
           tokens, measured per candidate shape): the Pareto front of (held-out KL, measured latency) and where the
           hand-picked target sits against it (its KL and latency measured the same way).

Writes bench/results/search_quality_{budget,latency}.{md,json}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import WIDTH_TARGET, md_table, write_results

import llmprune


def budget(out: Path) -> None:
    searched = llmprune.run("smollm2_minitron_search", [f"output_dir={out}/searched"])
    picked = llmprune.run("smollm2_minitron", [f"output_dir={out}/hand_picked"])
    s = searched["search"]
    rows = [[name, f"{r['params']['after'] / 1e6:.2f}M", f"{r['eval']['pruned']['perplexity']:.2f}",
             f"{r['eval']['final']['perplexity']:.2f}", f"{r['eval']['final']['kl_to_teacher']:.4f}"]
            for name, r in (("searched: " + s["pick"], searched), ("hand-picked: hidden 448 / FFN 1024", picked))]
    markdown = "\n".join([
        "# Architecture search vs hand-picked target, SmolLM2-135M, 84.0M-parameter budget", "",
        md_table(["architecture", "params", "pruned ppl", "distilled ppl", "distilled KL"], rows), "",
        f"Search: {s['seconds']:.0f} s, {s['scores_taken']} scores ({s['scores_per_minute']} per minute); noise "
        f"{s['noise']}; rank correlation pruned-only vs distilled: {s['rank_correlation']}."])
    write_results("search_quality_budget", markdown, {"searched": searched, "hand_picked": picked})


def latency(out: Path) -> None:
    overrides = [f"output_dir={out}/latency", "prune.constraints.params=null", "prune.constraints.latency=70%",
                 "search.objectives=[kl,latency]", "search.seq_len=256", "distill.max_steps=0"]
    report = llmprune.run("smollm2_minitron_search", overrides)
    s = report["search"]
    hand = next((r for r in s["scored"] if all(r[k] == v for k, v in WIDTH_TARGET.items())
                 and r["num_layers"] == 30 and r["num_attention_heads"] == 9), None)
    rows = [[r["key"], f"{r['latency'] * 1e3:.1f}", f"{r['pruned_kl']:.4f}", "front" if r["key"] in s["front"] else ""]
            for r in s["scored"]]
    markdown = "\n".join([
        "# Pareto front of held-out KL and measured prefill latency, SmolLM2-135M, this CPU", "",
        f"Pick ({s['pick_rule']}): {s['pick']}. Hand-picked target "
        + (f"evaluated by the search: latency {hand['latency'] * 1e3:.1f} ms, KL {hand['pruned_kl']:.4f}."
           if hand else "not among the evaluated candidates (see front.csv)."), "",
        md_table(["candidate", "latency (ms)", "pruned KL", ""], rows), "",
        f"Front plot: {out}/latency/search/front.png"])
    write_results("search_quality_latency", markdown, {"search": s})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("budget", "latency", "all"), default="all")
    parser.add_argument("--out", default="outputs/bench_search")
    args = parser.parse_args()
    if args.part in ("budget", "all"):
        budget(Path(args.out))
    if args.part in ("latency", "all"):
        latency(Path(args.out))


if __name__ == "__main__":
    main()
