"""Usage: python bench/prune_quality.py [--part width|depth|depth-default|all] [--random-seeds 3] [--eval-samples 32]
                                      [--depth-samples N 32] [--kl-samples N] [--contiguous-samples N]
                                      [--before-samples 6] [--reference-samples 32]

Pruning quality on SmolLM2-135M-Instruct (no distillation): held-out perplexity and KL(teacher || student) for
Minitron against simple baselines at the same shapes.

  width: hidden 576 -> 448, FFN 1536 -> 1024 (heads kept). Minitron (activation importance, with and without
         rescale_norms), gradient Taylor, weight magnitude, random channels (one row per seed).
  depth: 30 -> 20 layers. drop_one (lm_loss, kl), block_importance, contiguous (lm_loss, kl) and "drop the last 10".
         drop_one / contiguous scores use the first n calibration samples (prune.depth.num_samples): drop_one
         lm_loss for each n in --depth-samples, drop_one kl for --kl-samples, contiguous for --contiguous-samples
         (N: the shipped default). Block importance always uses all 32 (it comes from the calibration pass).
  depth-default: drop_one lm_loss at the shipped prune.depth.num_samples, before vs after #15 item 10: its cost as
         a multiple of one calibration pass (activation scores over the 32 calibration samples, what the calibrate
         stage runs) and its held-out quality. Before: --before-samples with the candidates run one at a time (the
         code before); after: the shipped default with the candidates stacked (the same scores, checked here at
         --before-samples). All timings in one process, back to back, calibration timed before and after the arms
         (the CPU is shared). Then drop_one with --reference-samples for the quality reference (not timed).

Data are the default recipe's: packed 256-token samples of the embedded pydoc text; calibration = 32 samples from
the head (batch 4), evaluation = the first --eval-samples windows of the held-out tail (eval_fraction 0.1), which
calibration never sees. Writes bench/results/prune_quality_{width,depth,depth_default}.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from _common import WIDTH_TARGET, CachedTeacher, Setup, data_info, md_table, setup, write_results

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.api import prune
from llmprune.config.schema import DepthConfig
from llmprune.evaluate import evaluate
from llmprune.importance.activation import activation_scores
from llmprune.importance.baselines import baseline_scores
from llmprune.importance.depth import removal_scores
from llmprune.plan import make_plan

NUM_LAYERS = 20
SHIPPED_SAMPLES = DepthConfig.num_samples  # prune.depth.num_samples as shipped
TEACHER: list[CachedTeacher] = []  # the teacher's held-out logits, computed once (main)


def params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_and_eval(s: Setup, scores: dict, targets: dict, depth_method: str = "drop_one", depth_metric: str = "lm_loss",
                   rescale_norms: bool = False) -> tuple[dict, object]:
    """Plan from `scores`, apply it to a copy of the teacher, evaluate on the held-out batches."""
    plan = make_plan(s.adapter.family, scores, s.adapter.dims(), targets, depth_method, depth_metric, rescale_norms)
    student = copy.deepcopy(s.model)
    student = get_adapter(student).apply(plan)
    result = evaluate(student, s.heldout, teacher=TEACHER[0], desc="evaluate student")
    result["params"] = params(student)
    del student
    return result, plan


def run_width(s: Setup, teacher_eval: dict, seeds: int) -> None:
    rows, payload = [], {}
    timings = {}

    def record(name: str, importance: str, result: dict, note: str = ""):
        payload[name] = {**result, "importance": importance, "note": note}
        rows.append([name, importance, result["params"], result["perplexity"], result["kl_to_teacher"], note])
        print(f"{name}: ppl {result['perplexity']:.1f}  KL {result['kl_to_teacher']:.3f}", flush=True)

    start = time.perf_counter()
    act = activation_scores(s.model, s.adapter, s.calib, total=len(s.calib))
    timings["activation_scores_s"] = time.perf_counter() - start
    for rescale in (False, True):
        result, plan = prune_and_eval(s, act, WIDTH_TARGET, rescale_norms=rescale)
        record(f"Minitron (rescale_norms={rescale})", "activation", result, f"mass kept {plan.summary}")
        if not rescale:
            minitron_plan = plan

    # the public API on a copy must build the same plan from the same data
    api_model, api_plan = prune(copy.deepcopy(s.model), export_config=WIDTH_TARGET, calib_data=s.splits.calib)
    assert api_plan.hidden == minitron_plan.hidden and api_plan.ffn == minitron_plan.ffn, "api.prune differs"
    del api_model

    start = time.perf_counter()
    taylor = baseline_scores("taylor", s.model, s.adapter, s.calib)
    timings["taylor_scores_s"] = time.perf_counter() - start
    s.model.zero_grad(set_to_none=True)
    record("gradient Taylor", "taylor", prune_and_eval(s, taylor, WIDTH_TARGET)[0])
    record("gradient Taylor (rescale_norms=True)", "taylor", prune_and_eval(s, taylor, WIDTH_TARGET,
                                                                            rescale_norms=True)[0])
    record("weight magnitude", "magnitude", prune_and_eval(s, baseline_scores("magnitude", s.model, s.adapter, s.calib),
                                                           WIDTH_TARGET)[0])
    random_losses = []
    for seed in range(seeds):
        result = prune_and_eval(s, baseline_scores("random", s.model, s.adapter, s.calib, seed=seed), WIDTH_TARGET)[0]
        random_losses.append(result["loss"])
        record(f"random channels (seed {seed})", "random", result)
    mean_loss = sum(random_losses) / len(random_losses)
    payload["random (geometric mean)"] = {"perplexity": math.exp(mean_loss), "loss": mean_loss}

    minitron = payload["Minitron (rescale_norms=False)"]["perplexity"]
    best_simple = min(payload["weight magnitude"]["perplexity"], math.exp(min(random_losses)))
    targets = {
        "minitron_ppl_at_most_half_best_simple_baseline": minitron <= best_simple / 2,
        "minitron_beats_taylor": minitron < payload["gradient Taylor"]["perplexity"],
        "minitron_ppl": minitron, "best_simple_baseline_ppl": best_simple,
        "ratio_best_simple_over_minitron": best_simple / minitron,
    }
    header = ["method", "importance", "params", "held-out ppl", "KL to teacher (nats/token)", "note"]
    table = [["teacher", "-", params(s.model), teacher_eval["perplexity"], 0.0, ""]] + rows
    table.append(["random channels (geo. mean over seeds)", "random", rows[-1][2], math.exp(mean_loss), "", ""])
    hidden, ffn = WIDTH_TARGET["hidden_size"], WIDTH_TARGET["ffn_hidden_size"]
    md = (f"## Width pruning: hidden 576 -> {hidden}, FFN 1536 -> {ffn} (no distillation)\n\n"
          f"Held-out: {s.splits.heldout.shape[0]} x {s.splits.heldout.shape[1]} tokens from the "
          f"tail; calibration: {s.splits.calib.shape[0]} x {s.splits.calib.shape[1]} from the head.\n\n"
          + md_table(header, table)
          + "\n\nTargets: Minitron ppl <= half the best simple baseline (magnitude, best random seed): "
          f"{targets['minitron_ppl_at_most_half_best_simple_baseline']} "
          f"(ratio {targets['ratio_best_simple_over_minitron']:.1f}x); Minitron beats Taylor: "
          f"{targets['minitron_beats_taylor']}.\n\nScoring time: activation {timings['activation_scores_s']:.1f} s, "
          f"Taylor {timings['taylor_scores_s']:.1f} s.")
    write_results("prune_quality_width", md, {"data": data_info(s), "teacher": teacher_eval, "target": WIDTH_TARGET,
                                              "results": payload, "targets": targets, "timings": timings})


def depth_scores(s: Setup, metric: str, samples: list[int], contiguous_samples: list[int]) -> tuple[dict, dict]:
    """removal_scores on the first n calibration samples: drop-one for each n in `samples`, contiguous (block of
    30 - 20 = 10 layers) for each n in `contiguous_samples`.

    Batches are disjoint and have no padding, so the drop-one score on the first n2 samples is the token-weighted
    mean of the scores on the first n1 and on samples n1..n2; each batch is therefore scored once.
    """
    out, timings, done, acc = {}, {}, 0, None
    drop = s.adapter.dims()["num_layers"] - NUM_LAYERS
    for n in sorted(samples):
        batches = text.to_batches(s.splits.calib[done:n], 4)
        start = time.perf_counter()
        part = removal_scores(s.model, s.adapter, batches, metric, drop_one=True, total=len(batches))
        timings[f"drop_one.{metric}.samples_{done}_{n}_s"] = time.perf_counter() - start
        acc = part if acc is None else {k: (acc[k] * done + part[k] * (n - done)) / n for k in acc}
        done = n
        out[("drop_one", n)] = dict(acc)
    for n in contiguous_samples:
        batches = text.to_batches(s.splits.calib[:n], 4)
        start = time.perf_counter()
        out[("contiguous", n)] = removal_scores(s.model, s.adapter, batches, metric, drop_one=False,
                                                block_sizes=(drop,), total=len(batches))
        timings[f"contiguous.{metric}.samples_0_{n}_s"] = time.perf_counter() - start
    return out, timings


def run_depth(s: Setup, teacher_eval: dict, samples: list[int], kl_samples: list[int], contiguous_samples: list[int],
              metrics: list[str]) -> None:
    target = {"num_layers": NUM_LAYERS}
    act = activation_scores(s.model, s.adapter, s.calib, total=len(s.calib))
    rows, payload, timings = [], {}, {}

    def record(name: str, result: dict, plan, note: str = ""):
        removed = plan.depth.get("removed")
        payload[name] = {**result, "removed": removed, "depth": plan.depth, "note": note}
        rows.append([name, result["perplexity"], result["kl_to_teacher"], " ".join(map(str, removed)), note])
        print(f"{name}: ppl {result['perplexity']:.1f}  KL {result['kl_to_teacher']:.3f}  removed {removed}",
              flush=True)

    result, plan = prune_and_eval(s, act, target, "block_importance")
    record("block_importance (32 samples)", result, plan)
    last = {"block_importance": torch.arange(30, 0, -1, dtype=torch.float32)}  # lowest = the last layers
    result, plan = prune_and_eval(s, last, target, "block_importance")
    plan.depth["method"] = "last"
    record("drop the last 10 layers", result, plan)
    raw_scores = {}
    for metric in metrics:
        by_n, t = depth_scores(s, metric, samples if metric == "lm_loss" else kl_samples, contiguous_samples)
        timings.update(t)
        for (method, n), scores in by_n.items():
            raw_scores[f"{method}.{metric}.{n}"] = {k: [round(x, 5) for x in v.tolist()] for k, v in scores.items()}
            result, plan = prune_and_eval(s, scores, target, method, metric)
            record(f"{method} {metric} ({n} samples)", result, plan)

    best_drop_one = min(v["perplexity"] for k, v in payload.items() if k.startswith("drop_one lm_loss"))
    default = payload.get(f"drop_one lm_loss ({SHIPPED_SAMPLES} samples)", {}).get("perplexity")
    bi = payload["block_importance (32 samples)"]["perplexity"]
    last_ppl = payload["drop the last 10 layers"]["perplexity"]
    targets = {"drop_one_default_at_least_as_good_as_block_importance": default is not None and default <= bi,
               "drop_one_best_at_least_as_good_as_block_importance": best_drop_one <= bi,
               "drop_one_far_better_than_dropping_last": default is not None and default * 2 <= last_ppl,
               "drop_one_default_ppl": default, "block_importance_ppl": bi, "drop_last_ppl": last_ppl}
    header = ["method", "held-out ppl", "KL to teacher", "removed layers", "note"]
    table = [["teacher (30 layers)", teacher_eval["perplexity"], 0.0, "", ""]] + rows
    md = (f"## Depth pruning: 30 -> {NUM_LAYERS} layers (no distillation)\n\nHeld-out: {s.splits.heldout.shape[0]} x "
          f"{s.splits.heldout.shape[1]} tokens from the tail. Block importance uses all 32 calibration samples; "
          "drop_one / contiguous use the first n (prune.depth.num_samples).\n\n" + md_table(header, table)
          + f"\n\nTargets: drop_one lm_loss ({SHIPPED_SAMPLES} samples, the shipped default) <= block importance: "
          f"{targets['drop_one_default_at_least_as_good_as_block_importance']}; far better (<= half) than dropping "
          f"the last 10: {targets['drop_one_far_better_than_dropping_last']}.\n\nBlock importance per layer: "
          + " ".join(f"{v:.3f}" for v in act["block_importance"].tolist())
          + "\n\nremoval_scores time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    write_results("prune_quality_depth", md, {"data": data_info(s), "teacher": teacher_eval, "results": payload,
                                              "targets": targets, "timings": timings, "scores": raw_scores,
                                              "block_importance": act["block_importance"].tolist()})


def run_depth_default(s: Setup, teacher_eval: dict, before_samples: int, reference_samples: int) -> None:
    """drop_one lm_loss at the shipped default against the default before #15 item 10: cost and quality.

    The CPU is shared and its load moves by 2x within minutes, so the arms are timed batch by batch, interleaved:
    calibration pass, before's batch b, after's batch b, calibration pass, ... Each depth batch counts as its time over
    the mean of the calibration passes on either side; an arm's cost is the sum over its batches. A drop-one score
    over several unpadded batches is their token-weighted mean, so per-batch scoring gives the arm's scores.
    """
    target, after_samples = {"num_layers": NUM_LAYERS}, SHIPPED_SAMPLES
    calib_s: list[float] = []
    arms = {"before": (before_samples, 1), "after": (after_samples, None)}  # samples, candidates_per_pass
    batch_s: dict[str, list[float]] = {arm: [] for arm in arms}
    ratios: dict[str, list[float]] = {arm: [] for arm in arms}
    parts: dict[str, list[tuple[int, dict]]] = {arm: [] for arm in arms}

    def calibration() -> dict:
        start = time.perf_counter()
        out = activation_scores(s.model, s.adapter, s.calib, total=len(s.calib))
        calib_s.append(time.perf_counter() - start)
        print(f"calibration pass: {calib_s[-1]:.1f} s", flush=True)
        return out

    act = calibration()
    pending: list[tuple[str, float]] = []  # depth batches waiting for the next calibration pass
    for b in range(0, max(n for n, _ in arms.values()), 4):
        for arm, (n, per_pass) in arms.items():
            if b >= n:
                continue
            batch = text.to_batches(s.splits.calib[b: min(b + 4, n)], 4)  # what calibrate hands removal_scores
            start = time.perf_counter()
            scores = removal_scores(s.model, s.adapter, batch, "lm_loss", drop_one=True, total=1,
                                    candidates_per_pass=per_pass)
            batch_s[arm].append(time.perf_counter() - start)
            parts[arm].append((min(b + 4, n) - b, scores))
            pending.append((arm, batch_s[arm][-1]))
            print(f"{arm} samples {b}..{min(b + 4, n) - 1}: {batch_s[arm][-1]:.1f} s", flush=True)
        calibration()
        around = (calib_s[-2] + calib_s[-1]) / 2
        for arm, seconds in pending:
            ratios[arm].append(seconds / around)
        pending.clear()

    def combined(arm: str) -> dict:
        total = sum(rows for rows, _ in parts[arm])
        return {k: sum(rows * p[k] for rows, p in parts[arm]) / total for k in parts[arm][0][1]}

    name = "depth.drop_one.lm_loss"
    first_before, first_after = parts["before"][0][1][name], parts["after"][0][1][name]  # samples 0..3 both
    score_diff = float((first_before - first_after).abs().max())
    assert torch.allclose(first_before, first_after, rtol=1e-4, atol=1e-5), (first_before, first_after)
    speedup = batch_s["before"][0] / batch_s["after"][0]

    rows, payload = [], {}

    def record(arm: str, n: int, code: str, scores: dict, method: str = "drop_one"):
        result, plan = prune_and_eval(s, scores, target, method)
        removed = plan.depth.get("removed")
        seconds, ratio = (sum(batch_s[arm]), sum(ratios[arm])) if arm in batch_s else (None, None)
        payload[arm] = {**result, "num_samples": n, "code": code, "search_s": seconds, "x_calibration": ratio,
                        "batch_s": batch_s.get(arm), "batch_x_calibration": ratios.get(arm), "removed": removed}
        rows.append([arm, n, code, "" if seconds is None else seconds, "" if ratio is None else f"{ratio:.2f}x",
                     result["perplexity"], result["kl_to_teacher"], " ".join(map(str, removed))])
        print(f"{arm}: ppl {result['perplexity']:.2f}  KL {result['kl_to_teacher']:.3f}  removed {removed}", flush=True)

    record("block_importance (context)", 32, "from the calibration pass", act, "block_importance")
    record("before", before_samples, "one candidate at a time", combined("before"))
    record("after", after_samples, "candidates stacked", combined("after"))

    def write(reference: bool) -> None:
        targets = {"after_at_most_5x_calibration": payload["after"]["x_calibration"] <= 5.0,
                   "after_x_calibration": payload["after"]["x_calibration"],
                   "before_x_calibration": payload["before"]["x_calibration"],
                   "speedup_same_batch": speedup, "max_abs_score_difference_same_batch": score_diff}
        header = ["arm", "depth.num_samples", "candidates", "depth search s", "x calibration pass", "held-out ppl",
                  "KL to teacher", "removed layers"]
        table = [["teacher (30 layers)", "", "", "", "", teacher_eval["perplexity"], 0.0, ""]] + rows
        md = (f"## Depth search at the shipped default: 30 -> {NUM_LAYERS} layers by drop-one LM loss (#15 item 10)"
              f"\n\nBefore: prune.depth.num_samples={before_samples} (the old default), candidates run one at a time "
              f"(the code before this change: each candidate resumes from its recorded layer input and runs the "
              f"layers after it alone). After: the shipped default num_samples={after_samples}, every candidate "
              f"stacked along the batch through each layer (llmprune/importance/depth.py). One calibration pass = "
              f"activation scores over the 32 calibration samples, what the calibrate stage runs "
              f"({', '.join(f'{t:.1f}' for t in calib_s)} s over the run). Held-out: {s.splits.heldout.shape[0]} x "
              f"{s.splits.heldout.shape[1]} tokens from the tail; no distillation.\n\n"
              + md_table(header, table)
              + f"\n\nSame batch (samples 0..3), both codes: {batch_s['before'][0]:.1f} s one at a time, "
              f"{batch_s['after'][0]:.1f} s stacked ({speedup:.2f}x faster); scores equal within {score_diff:.1g} "
              f"(float32 rounding). Target: the depth search at most 5x one calibration pass at the shipped default: "
              f"**{'met' if targets['after_at_most_5x_calibration'] else 'missed'}** "
              f"({payload['after']['x_calibration']:.2f}x; before: {payload['before']['x_calibration']:.2f}x)."
              f"\n\nHow it was timed: the CPU (2 cores) was shared with other engineers' jobs (load average "
              f"{machine_load()}), and the load moved by 2x within minutes, so absolute seconds are inflated and "
              "vary. All arms ran in one process, batch by batch and interleaved (calibration pass, before's batch, "
              "after's batch, calibration pass, ...); each depth batch is divided by the mean of the two calibration "
              "passes around it and an arm's 'x calibration pass' is the sum over its batches. Per-batch values are "
              "in the .json.")
        if reference_samples and not reference:
            md += f"\n\n(The {reference_samples}-sample reference row is still running.)"
        write_results("prune_quality_depth_default", md, {"data": data_info(s), "teacher": teacher_eval,
                                                          "results": payload, "targets": targets,
                                                          "calibration_s": calib_s})

    write(reference=False)
    if reference_samples > after_samples:
        acc, done = combined("after"), after_samples  # disjoint unpadded batches: token-weighted means combine
        part = drop_one_range(s, done, reference_samples)
        scores = {k: (acc[k] * done + part[k] * (reference_samples - done)) / reference_samples for k in acc}
        record("reference (not timed)", reference_samples, "candidates stacked", scores)
        write(reference=True)


def drop_one_range(s: Setup, start: int, stop: int) -> dict:
    """drop_one lm_loss scores on calibration samples start .. stop - 1 (batches of 4)."""
    batches = text.to_batches(s.splits.calib[start:stop], 4)
    return removal_scores(s.model, s.adapter, batches, "lm_loss", drop_one=True, total=len(batches))


def machine_load() -> str:
    import os

    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " over 1 / 5 / 15 min at the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("width", "depth", "depth-default", "all"), default="all")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out 256-token windows")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--depth-samples", type=int, nargs="+", default=[SHIPPED_SAMPLES, 32],
                        help="prune.depth.num_samples values for drop_one / contiguous with lm_loss")
    parser.add_argument("--kl-samples", type=int, nargs="*", default=[SHIPPED_SAMPLES],
                        help="the same for the kl metric")
    parser.add_argument("--contiguous-samples", type=int, nargs="*", default=[SHIPPED_SAMPLES],
                        help="prune.depth.num_samples values for contiguous (both metrics)")
    parser.add_argument("--before-samples", type=int, default=6,
                        help="depth-default: prune.depth.num_samples before #15 item 10")
    parser.add_argument("--reference-samples", type=int, default=32,
                        help="depth-default: drop_one quality reference (0: none)")
    parser.add_argument("--depth-metrics", nargs="+", default=["lm_loss", "kl"], choices=("lm_loss", "kl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    s = setup(eval_samples=args.eval_samples)
    print(f"loaded in {s.load_s:.0f} s; calib {tuple(s.splits.calib.shape)}, held-out {tuple(s.splits.heldout.shape)}",
          flush=True)
    TEACHER.append(CachedTeacher(s.model))
    teacher_eval = evaluate(s.model, s.heldout, teacher=TEACHER[0], desc="evaluate teacher")  # fills the cache
    assert teacher_eval["kl_to_teacher"] < 1e-6, teacher_eval
    print(f"teacher: ppl {teacher_eval['perplexity']:.2f}", flush=True)
    if args.part in ("width", "all"):
        run_width(s, teacher_eval, args.random_seeds)
    if args.part in ("depth", "all"):
        run_depth(s, teacher_eval, args.depth_samples, args.kl_samples, args.contiguous_samples,
                  args.depth_metrics)
    if args.part in ("depth-default", "all"):
        run_depth_default(s, teacher_eval, args.before_samples, args.reference_samples)


if __name__ == "__main__":
    main()
