"""Usage: python bench/gradnas_vs_minitron.py [--calib-samples 32] [--eval-samples 32]

GradNAS against Minitron on SmolLM2-135M (float32, no distillation), at one parameter count: that of the default
recipe's width target (hidden 576 -> 448, FFN 1536 -> 1024: 83,978,944 parameters).

  Minitron: activation importance, the hidden size, FFN and embeddings shrink uniformly in every layer
            (`llmprune.prune(model, export_config=WIDTH_TARGET)`).
  GradNAS:  causal-LM gradient scores of every query group (a KV head with its 3 query heads) and FFN neuron; the
            hidden size stays 576, so the tied 49152 x 576 embedding (28.3M) stays whole and the layers give up the
            rest: per layer, 0..3 groups and 0..1536 neurons, chosen by the knapsack and the threshold rule
            (`llmprune.prune(model, mode="gradnas", constraints={"params": <Minitron's count>})`).

Data are the default recipe's (bench/_common.py `setup`): packed 256-token windows of the embedded pydoc text,
calibration from the head (batch 4; the same samples feed both methods), evaluation on the held-out tail, which
calibration never sees. FLOPs are forward FLOPs of one 256-token sequence (the cost model; FlopCounterMode-exact).
Writes bench/results/gradnas_vs_minitron.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import WIDTH_TARGET, CachedTeacher, data_info, md_table, setup, write_results

from llmprune.adapters import get_adapter
from llmprune.api import prune
from llmprune.evaluate import evaluate
from llmprune.importance.gradnas import gradnas_scores

EXPECTED_PARAMS = 83_978_944  # Minitron at WIDTH_TARGET (tied embedding counted once)
SEQ_LEN = 256


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32, help="256-token calibration windows (batch 4)")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out 256-token windows")
    args = parser.parse_args()
    torch.manual_seed(0)
    s = setup(seq_len=SEQ_LEN, num_samples=args.calib_samples, eval_samples=args.eval_samples, batch_size=4)
    assert next(s.model.parameters()).dtype == torch.float32, next(s.model.parameters()).dtype
    print(f"loaded in {s.load_s:.0f} s; calib {tuple(s.splits.calib.shape)}, held-out {tuple(s.splits.heldout.shape)}",
          flush=True)
    teacher = CachedTeacher(s.model)
    teacher_eval = evaluate(s.model, s.heldout, teacher=teacher, desc="evaluate teacher")  # fills the cache
    cost = get_adapter(s.model).cost_model()
    rows = [["teacher", "-", "576 / 1536 / 9 heads", params(s.model), cost.flops(SEQ_LEN),
             teacher_eval["perplexity"], 0.0, "-"]]
    payload: dict = {"teacher": teacher_eval}
    timings: dict[str, float] = {}

    start = time.perf_counter()
    minitron, plan = prune(copy.deepcopy(s.model), export_config=WIDTH_TARGET, calib_data=s.splits.calib,
                           seq_len=SEQ_LEN, batch_size=4)
    timings["minitron_prune_s"] = time.perf_counter() - start
    budget = params(minitron)
    assert budget == EXPECTED_PARAMS, (budget, EXPECTED_PARAMS)
    result = evaluate(minitron, s.heldout, teacher=teacher, desc="evaluate minitron")
    flops = cost.flops(SEQ_LEN, target=plan.target)
    payload["minitron"] = {**result, "params": budget, "flops": flops, "target": WIDTH_TARGET}
    rows.append(["Minitron", "activation", "448 / 1024 / 9 heads, every layer", budget, flops,
                 result["perplexity"], result["kl_to_teacher"], f"{timings['minitron_prune_s']:.0f}"])
    print(f"Minitron: {budget:,} params, ppl {result['perplexity']:.2f}", flush=True)
    del minitron

    start = time.perf_counter()
    scores = gradnas_scores(s.model, s.calib, "causal_lm")  # one backward per batch; shared by both rules
    timings["gradnas_scores_s"] = time.perf_counter() - start
    for rule in ("knapsack", "threshold"):
        start = time.perf_counter()
        student, plan = prune(s.model, mode="gradnas", constraints={"params": budget}, scores=scores, rule=rule,
                              seq_len=SEQ_LEN)  # physically_pruned copies: s.model stays whole
        timings[f"gradnas_{rule}_plan_s"] = time.perf_counter() - start
        g = plan.summary["gradnas"]
        assert params(student) == g["effective"]["params"] <= budget, (params(student), g["effective"], budget)
        result = evaluate(student, s.heldout, teacher=teacher, desc=f"evaluate gradnas {rule}")
        groups, ffn = g["groups"], g["ffn"]
        shape = (f"576 / {min(ffn)}..{max(ffn)} (sum {sum(ffn)}) / groups {sum(groups)} of {3 * len(groups)}, "
                 f"{groups.count(0)} layers without attention")
        payload[f"gradnas_{rule}"] = {**result, "params": g["effective"]["params"], "flops": g["effective"]["flops"],
                                      "groups_per_layer": groups, "ffn_per_layer": ffn,
                                      "kept_score_share": g["kept_score"] / g["total_score"]}
        rows.append([f"GradNAS ({rule})", "causal_lm gradients", shape, g["effective"]["params"],
                     g["effective"]["flops"], result["perplexity"], result["kl_to_teacher"],
                     f"{timings['gradnas_scores_s'] + timings[f'gradnas_{rule}_plan_s']:.0f}"])
        print(f"GradNAS {rule}: {g['effective']['params']:,} params, ppl {result['perplexity']:.2f}; groups "
              f"{groups}; ffn {ffn}", flush=True)
        del student

    header = ["method", "importance", "hidden / FFN / attention", "params", "FLOPs (256 tokens)", "held-out ppl",
              "KL to teacher (nats/token)", "prune time (s)"]
    md = (f"## GradNAS vs Minitron on SmolLM2-135M at {budget:,} parameters (no distillation)\n\n"
          f"Held-out: {s.splits.heldout.shape[0]} x {s.splits.heldout.shape[1]} tokens from the tail; calibration: "
          f"{s.splits.calib.shape[0]} x {s.splits.calib.shape[1]} from the head (both methods), float32 on CPU.\n\n"
          + md_table(header, rows)
          + "\n\nGradNAS keeps the hidden size, so the tied embedding (28.3M of the 134.5M) stays whole and the 30 "
          "layers lose about half their parameters; Minitron narrows the embedding and every layer alike.\n\n"
          + "\n".join(f"- GradNAS ({rule}) per layer: groups {payload[f'gradnas_{rule}']['groups_per_layer']}, "
                      f"FFN {payload[f'gradnas_{rule}']['ffn_per_layer']}" for rule in ("knapsack", "threshold")))
    write_results("gradnas_vs_minitron", md, {"data": data_info(s), "budget_params": budget, "results": payload,
                                              "timings": timings})


if __name__ == "__main__":
    main()
