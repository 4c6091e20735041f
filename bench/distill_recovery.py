"""Usage: python bench/distill_recovery.py [--tokens 100000,300000] [--methods minitron,magnitude,random_init]

Recovery by distillation on SmolLM2-135M at the default width target (hidden 448, FFN 1024): held-out perplexity
and KL to the teacher after pruning and after a fixed distillation token budget, for
  minitron     activation importance (the default recipe's student),
  magnitude    the same shape pruned by weight magnitude,
  random_init  the same shape initialised at random,
all distilled with the default recipe's loss and schedule (forward KL, AdamW 3e-4, warmup 10, cosine, 4 x 256
tokens a step, bf16 autocast where the CPU has it) on the head of the embedded text; evaluation on the held-out
tail. Writes bench/results/distill_recovery.{md,json}; a later run merges its rows with the recorded ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, setup  # noqa: E402

from llmprune.adapters import get_adapter  # noqa: E402
from llmprune.api import prune  # noqa: E402
from llmprune.config import DistillConfig  # noqa: E402
from llmprune.distill import Student, distill_loss, train  # noqa: E402
from llmprune.evaluate import evaluate  # noqa: E402

TARGET = {"hidden_size": 448, "ffn_hidden_size": 1024}
SEQ, BATCH = 256, 4


def student_for(method: str, s) -> torch.nn.Module:
    student = copy.deepcopy(s.model)
    importance = "activation" if method in ("minitron", "random_init") else method
    prune(student, export_config=TARGET, calib_data=s.splits.calib, importance=importance, batch_size=BATCH)
    if method == "random_init":  # same architecture, weights drawn like transformers' llama initialisation
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, student.config.initializer_range)
    return student


def distill(student, teacher, s, steps: int, eval_every: int) -> list[dict]:
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "max_steps": steps, "micro_batch_size": BATCH,
                             "global_batch_size": BATCH, "lr": 3e-4, "warmup_steps": 10, "eval_every": eval_every,
                             "save_every": steps, "keep_checkpoints": 1})
    student.requires_grad_(True)

    def evaluate_fn():
        r = evaluate(student, s.heldout, teacher=teacher)
        return {"eval_perplexity": r["perplexity"], "eval_kl": r["kl_to_teacher"]}

    with tempfile.TemporaryDirectory() as tmp:
        return train(Student(student), s.splits.train, distill_loss(teacher, cfg, ()), cfg, Path(tmp), "distill",
                     "bench", evaluate_fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="100000", help="comma-separated token budgets (each a separate run)")
    parser.add_argument("--methods", default="minitron,magnitude,random_init")
    args = parser.parse_args()
    budgets = [int(t) for t in args.tokens.split(",")]
    s = setup(eval_samples=32)
    teacher = s.model.requires_grad_(False)
    teacher_eval = evaluate(teacher, s.heldout)
    out_json = RESULTS / "distill_recovery.json"
    recorded = json.loads(out_json.read_text()) if out_json.exists() else {"rows": []}
    rows = [r for r in recorded["rows"] if (r["method"], r["tokens"]) not in
            {(m, b) for m in args.methods.split(",") for b in budgets}]
    for method in args.methods.split(","):
        for budget in budgets:
            steps = max(1, round(budget / (SEQ * BATCH)))
            student = student_for(method, s)
            assert get_adapter(student).count_params() == 83_978_944
            before = evaluate(student, s.heldout, teacher=teacher)
            start = time.perf_counter()
            history = distill(student, teacher, s, steps, eval_every=max(1, steps // 4))
            seconds = time.perf_counter() - start
            curve = [(r["tokens"], round(r["eval_perplexity"], 2)) for r in history if "eval_perplexity" in r]
            rows.append({"method": method, "tokens": steps * SEQ * BATCH, "steps": steps,
                         "ppl_pruned": before["perplexity"], "kl_pruned": before["kl_to_teacher"],
                         "ppl_distilled": history[-1]["eval_perplexity"], "kl_distilled": history[-1]["eval_kl"],
                         "seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 2), "curve": curve})
            print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["method"], r["tokens"]))
    result = {"teacher_ppl": teacher_eval["perplexity"], "target": TARGET, "heldout_tokens": s.splits.heldout.numel(),
              "machine": machine_info(), "rows": rows}
    out_json.write_text(json.dumps(result, indent=1))
    lines = ["## Distillation recovery: SmolLM2-135M -> hidden 448 / FFN 1024 (83,978,944 params)", "",
             f"Teacher held-out perplexity {teacher_eval['perplexity']:.2f} on {s.splits.heldout.numel():,} held-out "
             "tokens. Forward-KL distillation, AdamW 3e-4, 4 x 256 tokens a step.", "",
             "| student | distillation tokens | ppl after pruning | ppl after distillation | KL after | s/step |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['tokens']:,} | {r['ppl_pruned']:,.1f} | {r['ppl_distilled']:,.2f} | "
              f"{r['kl_distilled']:.3f} | {r['seconds_per_step']} |" for r in rows]
    (RESULTS / "distill_recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
