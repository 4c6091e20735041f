"""Usage: python bench/distill_recovery.py [--tokens 100000,300000,1000000] [--methods minitron,magnitude,random_init]

Recovery by distillation on SmolLM2-135M at the default width target (hidden 448, FFN 1024): held-out perplexity
and KL to the teacher after pruning and after each distillation token budget, for
  minitron     activation importance (the default recipe's student),
  magnitude    the same shape pruned by weight magnitude,
  random_init  the same shape initialised at random,
all distilled with the default recipe's loss (forward KL, AdamW 3e-4, warmup 10, 4 x 256 tokens a step, bf16
autocast where the CPU has it) on the head of the embedded text; evaluation on the held-out tail, which training
never sees. One run per method lasts the largest budget (its cosine schedule spans that budget) and is evaluated
when it passes each smaller one, so the 100K / 300K points are mid-schedule; `--per-budget` instead runs a full
schedule per budget (3x the time). Runs checkpoint under --work-dir and resume when restarted.
Writes bench/results/distill_recovery.{md,json}; a later run merges its rows with the recorded ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, WIDTH_TARGET, CachedTeacher, md_table, setup, write_results  # noqa: E402

from llmprune.adapters import get_adapter  # noqa: E402
from llmprune.api import prune  # noqa: E402
from llmprune.config import DistillConfig  # noqa: E402
from llmprune.distill.train import Student, distill_loss, train  # noqa: E402
from llmprune.evaluate import evaluate  # noqa: E402

SEQ, BATCH = 256, 4
TOKENS_PER_STEP = SEQ * BATCH


def student_for(method: str, s) -> torch.nn.Module:
    importance = "activation" if method in ("minitron", "random_init") else method
    student, _ = prune(s.model, export_config=WIDTH_TARGET, calib_data=s.splits.calib, importance=importance,
                       batch_size=BATCH)  # a new model: s.model stays the teacher
    if method == "random_init":  # same architecture, weights drawn like transformers' llama initialisation
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, student.config.initializer_range)
    return student


def distill(student, teacher, scorer, s, steps: int, eval_steps: set[int], run_dir: Path) -> list[dict]:
    """Distill for `steps` (resuming from run_dir) and evaluate after each step in `eval_steps`."""
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "max_steps": steps, "micro_batch_size": BATCH,
                             "global_batch_size": BATCH, "lr": 3e-4, "warmup_steps": 10, "eval_every": 1,
                             "save_every": 50, "keep_checkpoints": 1})
    student.requires_grad_(True)
    done = {"step": 0}

    def evaluate_fn(_trained):  # called after every step (eval_every=1); evaluates only at the budgets
        done["step"] += 1
        if done["step"] not in eval_steps:
            return {}
        r = evaluate(student, s.heldout, teacher=scorer)
        return {"eval_perplexity": r["perplexity"], "eval_kl": r["kl_to_teacher"]}

    done["step"] = _resumed_step(run_dir)
    return train(Student(student), s.splits.train, distill_loss(teacher, cfg, ()), cfg, run_dir, "distill",
                 f"bench-{steps}", evaluate_fn, seed=0)


def _resumed_step(run_dir: Path) -> int:
    pointer = run_dir / "distill_ckpt" / "latest"
    return int(pointer.read_text().strip().split("_")[1]) if pointer.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="100000,300000,1000000", help="comma-separated token budgets")
    parser.add_argument("--methods", default="minitron,magnitude,random_init")
    parser.add_argument("--per-budget", action="store_true", help="a full schedule per budget instead of one run")
    parser.add_argument("--work-dir", default="/tmp/llmprune-bench/distill_recovery", help="checkpoints (resume)")
    args = parser.parse_args()
    budgets = sorted(int(t) for t in args.tokens.split(","))
    steps_of = {b: max(1, round(b / TOKENS_PER_STEP)) for b in budgets}
    s = setup(eval_samples=32)
    teacher = s.model.requires_grad_(False)
    scorer = CachedTeacher(teacher)  # the held-out teacher logits, computed once for every evaluation
    teacher_eval = evaluate(teacher, s.heldout)
    out_json = RESULTS / "distill_recovery.json"
    recorded = json.loads(out_json.read_text()) if out_json.exists() else {"rows": []}
    methods = args.methods.split(",")
    schedule = "per_budget" if args.per_budget else "one_run"
    rows = [r for r in recorded["rows"] if not (r["method"] in methods and r["tokens"] in
                                                {steps_of[b] * TOKENS_PER_STEP for b in budgets}
                                                and r.get("schedule") == schedule)]
    for method in methods:
        runs = [[b] for b in budgets] if args.per_budget else [budgets]
        for run_budgets in runs:
            student = student_for(method, s)
            assert get_adapter(student).count_params() == 83_978_944
            before = evaluate(student, s.heldout, teacher=scorer)
            steps = steps_of[run_budgets[-1]]
            run_dir = Path(args.work_dir) / f"{method}-{schedule}-{steps}"
            run_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            history = distill(student, teacher, scorer, s, steps, {steps_of[b] for b in run_budgets}, run_dir)
            seconds = time.perf_counter() - start
            timed = [r for r in history if "seconds" in r]
            # "seconds" counts from the start of each session: the median gap between consecutive steps survives
            # resumes (a gap across a restart is negative and dropped; evaluation gaps are outliers)
            gaps = sorted(b["seconds"] - a["seconds"] for a, b in zip(timed, timed[1:]) if b["seconds"] > a["seconds"])
            for b in run_budgets:
                at = next(r for r in history if r["step"] == steps_of[b])
                rows.append({"method": method, "schedule": schedule, "tokens": at["tokens"], "steps": at["step"],
                             "schedule_steps": steps, "epochs": round(at["step"] * BATCH / len(s.splits.train), 2),
                             "ppl_pruned": before["perplexity"], "kl_pruned": before["kl_to_teacher"],
                             "ppl_distilled": at["eval_perplexity"], "kl_distilled": at["eval_kl"],
                             "train_loss": at["loss"], "seconds_this_session": round(seconds, 1),
                             "seconds_per_step": round(gaps[len(gaps) // 2], 2) if gaps else None})
                print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["method"], r.get("schedule", ""), r["tokens"]))
    text = (f"Teacher held-out perplexity {teacher_eval['perplexity']:.2f} on {s.splits.heldout.numel():,} held-out "
            f"tokens. Forward-KL distillation, AdamW 3e-4, warmup 10, cosine, 4 x 256 tokens a step, on "
            f"{s.splits.train.numel():,} training tokens (more tokens = more epochs over them). `one_run`: one "
            "schedule spanning the largest budget, evaluated on the way; `per_budget`: a full schedule per budget.")
    table = md_table(["student", "schedule", "distillation tokens", "epochs", "ppl after pruning",
                      "ppl after distillation", "KL after", "s/step"],
                     [[r["method"], r["schedule"], f"{r['tokens']:,}", r["epochs"], r["ppl_pruned"],
                       r["ppl_distilled"], r["kl_distilled"], r["seconds_per_step"]] for r in rows])
    write_results("distill_recovery", "\n\n".join(
        ["## Distillation recovery: SmolLM2-135M -> hidden 448 / FFN 1024 (83,978,944 params)", text, table]),
        {"teacher_ppl": teacher_eval["perplexity"], "target": WIDTH_TARGET,
         "heldout_tokens": s.splits.heldout.numel(), "train_tokens": s.splits.train.numel(), "rows": rows})

if __name__ == "__main__":
    main()
