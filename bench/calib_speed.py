"""Usage: python bench/calib_speed.py [--part throughput|depth|all] [--repeats 7] [--depth-repeats 1] [--profile]

Speed of calibration on SmolLM2-135M-Instruct (CPU, float32), with the default recipe's data (batch 4 x 256).

  throughput: tokens/s of `llmprune.importance.activation_scores` (every Minitron hook + Block Importance) on one
      batch against plain forward passes of the same batch: the full model (`model(input_ids)`, with the LM head
      and logits) and the backbone (`model.model(input_ids)`, what calibration runs since it needs no logits).
      Variants are timed in interleaved rounds (median over --repeats rounds) so load drift hits all of them.
  depth: the cost of `llmprune.importance.depth.removal_scores` with prune.depth.num_samples=8 (drop-one, 30 candidates;
      contiguous with block size 10, 21 candidates) relative to ONE calibration pass over the default 32 samples.
      --profile adds a torch.profiler op table of one drop-one batch.

Writes bench/results/calib_speed.{md,json}. Timings on a shared machine are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import data_info, machine_info, md_table, setup, write_results

from llmprune import data as text
from llmprune.importance.activation import activation_scores
from llmprune.importance.depth import removal_scores


def interleaved(fns: dict, repeats: int) -> dict[str, dict]:
    """Time every fn once per round, `repeats` rounds after one warm-up round; median per fn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "all_s": [round(x, 4) for x in t]}
            for name, t in times.items()}


def run_throughput(s, repeats: int) -> tuple[str, dict]:
    batch = s.calib[0]
    ids = batch.input_ids
    tokens = ids.numel()

    @torch.no_grad()
    def full():
        s.model(input_ids=ids, use_cache=False)

    @torch.no_grad()
    def backbone():
        s.model.model(input_ids=ids, use_cache=False)

    def calibrate():
        activation_scores(s.model, s.adapter, [batch], total=1)

    t = interleaved({"full forward model(ids)": full, "backbone forward model.model(ids)": backbone,
                     "activation_scores (all hooks)": calibrate}, repeats)
    cal = t["activation_scores (all hooks)"]["median_s"]
    rows = []
    for name, r in t.items():
        rows.append([name, r["median_s"], r["min_s"], tokens / r["median_s"], r["median_s"] / cal])
    ratios = {"calibration_vs_full_forward": t["full forward model(ids)"]["median_s"] / cal,
              "calibration_vs_backbone_forward": t["backbone forward model.model(ids)"]["median_s"] / cal}
    md = (f"### (a) Calibration throughput, one batch of {tuple(ids.shape)} = {tokens} tokens, median of {repeats} "
          "interleaved rounds\n\n"
          + md_table(["pass", "median s", "min s", "tokens/s (median)", "time / calibration time"], rows)
          + f"\n\nCalibration throughput as a fraction of the plain forward's (target >= 0.9):\n"
          f"- against the backbone forward (the same work calibration does, no LM head): "
          f"**{ratios['calibration_vs_backbone_forward']:.2f}x**\n"
          f"- against the full model forward (includes the 49152-way LM head, which calibration skips): "
          f"{ratios['calibration_vs_full_forward']:.2f}x")
    return md, {"tokens_per_batch": tokens, "timings": t, "ratios": ratios,
                "target_met_vs_backbone": ratios["calibration_vs_backbone_forward"] >= 0.9}


def depth_work_units(num_layers: int, drop: int, head_layer_equiv: float) -> dict[str, float]:
    """Layer runs per batch, counting the LM head (+ loss) as `head_layer_equiv` layers."""
    drop_one = sum(num_layers - 1 - i for i in range(num_layers)) + num_layers * head_layer_equiv
    contiguous = sum(num_layers - s - drop for s in range(num_layers - drop + 1)) + \
        (num_layers - drop + 1) * head_layer_equiv
    base = num_layers + head_layer_equiv  # the recording pass and the base loss
    return {"drop_one": drop_one + base, "contiguous": contiguous + base, "calibration": num_layers}


def profile_drop_one(s) -> str:
    from torch.profiler import ProfilerActivity, profile

    batches = text.to_batches(s.splits.calib[:4], 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        removal_scores(s.model, s.adapter, batches, "lm_loss", drop_one=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def run_depth(s, repeats: int, num_samples: int, drop: int, profile: bool) -> tuple[str, dict]:
    depth_batches = text.to_batches(s.splits.calib[:num_samples], 4)
    num_layers = len(s.adapter.layers)

    def calibrate():
        activation_scores(s.model, s.adapter, s.calib, total=len(s.calib))

    variants = {
        f"drop_one lm_loss ({num_samples} samples)":
            lambda: removal_scores(s.model, s.adapter, depth_batches, "lm_loss", drop_one=True),
        f"contiguous n{drop} lm_loss ({num_samples} samples)":
            lambda: removal_scores(s.model, s.adapter, depth_batches, "lm_loss", drop_one=False, block_sizes=(drop,)),
        f"drop_one kl ({num_samples} samples)":
            lambda: removal_scores(s.model, s.adapter, depth_batches, "kl", drop_one=True),
    }
    # calibration runs before and after every variant: each ratio divides by the mean of its two neighbours, so a
    # change of machine load during the run hits numerator and denominator alike
    calib_name = "calibration (activation_scores, 32 samples)"
    timings: dict[str, list[float]] = {calib_name: []}
    ratios: dict[str, list[float]] = {}
    loads: list[float] = []

    def clock(name, fn):
        start = time.perf_counter()
        fn()
        timings.setdefault(name, []).append(time.perf_counter() - start)
        loads.append(round(os.getloadavg()[0], 2))
        print(f"{name}: {timings[name][-1]:.1f} s (load {loads[-1]})", flush=True)

    calibrate()  # warm-up
    for _ in range(repeats):
        clock(calib_name, calibrate)
        for name, fn in variants.items():
            clock(name, fn)
            clock(calib_name, calibrate)
            neighbours = timings[calib_name][-2:]
            ratios.setdefault(name, []).append(timings[name][-1] / (sum(neighbours) / 2))
    med = {name: statistics.median(t) for name, t in timings.items()}
    calib = med[calib_name]

    # the LM head (final norm + lm_head on a batch) in decoder-layer equivalents, both timed on a real batch
    ids = s.calib[0].input_ids
    with torch.no_grad():
        hidden = s.model.model(input_ids=ids, use_cache=False).last_hidden_state
        layer_t = _median_time(lambda: _run_layer(s, ids), 3)
        head_t = _median_time(lambda: s.adapter.logits(hidden), 3)
    units = depth_work_units(num_layers, drop, head_t / layer_t)
    rows = [[calib_name, calib, 1.0, "-"]]
    rows += [[name, med[name], statistics.median(r), len(r)] for name, r in ratios.items()]
    expected = {"drop_one": units["drop_one"] * len(depth_batches) / (units["calibration"] * len(s.calib)),
                "contiguous": units["contiguous"] * len(depth_batches) / (units["calibration"] * len(s.calib))}
    md = (f"### (b) Depth search cost relative to one calibration pass (32 samples, {len(s.calib)} batches)\n\n"
          + md_table(["pass", "median s", "x calibration (vs neighbouring calibration runs)", "runs"], rows)
          + f"\n\nTarget <= 5x. Work model (layer runs per batch, LM head = {head_t / layer_t:.1f} layers measured: "
          f"one layer {layer_t * 1000:.0f} ms, head {head_t * 1000:.0f} ms per batch): a drop-one batch re-runs "
          f"{units['drop_one']:.0f} layer-equivalents, a contiguous-{drop} batch {units['contiguous']:.0f}, a "
          f"calibration batch {units['calibration']}; with {len(depth_batches)} vs {len(s.calib)} batches the "
          f"floor for exact scores is about {expected['drop_one']:.1f}x (drop-one) and "
          f"{expected['contiguous']:.1f}x (contiguous).")
    payload = {"timings_s": timings, "median_s": med, "loadavg_1min_after_each": loads,
               "ratios": {name: statistics.median(r) for name, r in ratios.items()}, "ratios_all": ratios,
               "work_model": {**units, "layer_s": layer_t, "head_s": head_t, "expected_ratio": expected}}
    if profile:
        table = profile_drop_one(s)
        print(table)
        payload["profile_drop_one_one_batch"] = table
        md += "\n\n<details><summary>torch.profiler, drop-one lm_loss, one batch</summary>\n\n```\n" + table + \
            "\n```\n</details>"
    return md, payload


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_layer(s, ids):
    """One decoder layer's forward on a real batch (inputs recorded from a backbone pass)."""
    if not hasattr(_run_layer, "cache"):
        captured = {}

        def grab(mod, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        handle = s.adapter.layers[10].register_forward_pre_hook(grab, with_kwargs=True)
        s.model.model(input_ids=ids, use_cache=False)
        handle.remove()
        _run_layer.cache = captured
    s.adapter.layers[10](*_run_layer.cache["args"], **_run_layer.cache["kwargs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("throughput", "depth", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds for the throughput table")
    parser.add_argument("--depth-repeats", type=int, default=1, help="repeats of the depth-search timings")
    parser.add_argument("--depth-samples", type=int, default=8, help="prune.depth.num_samples")
    parser.add_argument("--drop", type=int, default=10, help="contiguous block size (layers removed)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one drop-one batch")
    args = parser.parse_args()
    s = setup()
    print(f"loaded in {s.load_s:.0f} s; threads {torch.get_num_threads()}; load {os.getloadavg()}", flush=True)
    sections, payload = ["## Calibration speed (SmolLM2-135M, CPU float32)"], {"data": data_info(s)}
    payload["load_before"] = machine_info()["loadavg_1_5_15"]
    if args.part in ("throughput", "all"):
        md, payload["throughput"] = run_throughput(s, args.repeats)
        sections.append(md)
    if args.part in ("depth", "all"):
        md, payload["depth"] = run_depth(s, args.depth_repeats, args.depth_samples, args.drop, args.profile)
        sections.append(md)
    payload["load_after"] = machine_info()["loadavg_1_5_15"]
    sections.append(f"Load average (1, 5, 15 min) before: {payload['load_before']}, after: {payload['load_after']}; "
                    f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs.")
    write_results("calib_speed", "\n\n".join(sections), payload)


if __name__ == "__main__":
    main()
