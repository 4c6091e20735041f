"""report.json, report.md, the model card, the loss / eval curves and the end-of-run summary table."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_rows(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows) shared by the console table, report.md and the model card."""
    o, t, ev = report["original"], report["target"], report.get("eval", {})
    final = ev.get("final")
    header = ("", "original", "pruned") + (("distilled",) if final else ())
    params = report["params"]
    rows = [("parameters", _fmt_params(params["before"]), _fmt_params(params["after"]))
            + ((_fmt_params(params["after"]),) if final else ())]
    gradnas = report.get("gradnas")
    if gradnas:  # per-layer widths: the effective sizes, not the stock config's
        flops = gradnas["flops"]
        rows.append((f"FLOPs per {gradnas['seq_len']}-token sequence", _fmt_params(flops["before"]),
                     _fmt_params(flops["after"])) + ((_fmt_params(flops["after"]),) if final else ()))
        for key, name in (("heads", "num_attention_heads"), ("ffn", "ffn_hidden_size")):
            kept = " ".join(map(str, gradnas[key]))
            rows.append((f"{key} per layer", str(o[name]), kept) + ((kept,) if final else ()))
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "mamba_num_heads", "mamba_head_dim"):
        if key in o and not gradnas:
            rows.append((key, str(o[key]), str(t[key])) + ((str(t[key]),) if final else ()))
    if ev and "retrieval_top1" in ev["teacher"]:  # an encoder: sentence embeddings on held-out windows
        rows.append(("held-out retrieval top-1", _fmt(ev["teacher"]["retrieval_top1"], 3),
                     _fmt(ev["pruned"]["retrieval_top1"], 3)) + ((_fmt(final["retrieval_top1"], 3),) if final else ()))
        rows.append(("embedding cosine to original", "1", _fmt(ev["pruned"]["cosine_to_teacher"], 4))
                    + ((_fmt(final["cosine_to_teacher"], 4),) if final else ()))
    elif ev:
        rows.append(("held-out perplexity", _fmt(ev["teacher"]["perplexity"]), _fmt(ev["pruned"]["perplexity"]))
                    + ((_fmt(final["perplexity"]),) if final else ()))
        rows.append(("KL to original (nats/token)", "0", _fmt(ev["pruned"].get("kl_to_teacher"), 4))
                    + ((_fmt(final["kl_to_teacher"], 4),) if final else ()))
    rows += lm_eval_rows(report.get("lm_eval", {}), bool(final))
    return header, rows


def lm_eval_rows(scores: dict[str, dict], final: bool) -> list[tuple[str, ...]]:
    """One row per lm_eval task and metric: the teacher's, the pruned and (after distillation) the final score,
    each with its standard error; "-" where a model was not scored (eval.lm_eval.models)."""
    columns = ("teacher", "pruned") + (("final",) if final else ())
    first = next((scores[c] for c in columns if c in scores), {})
    rows = []
    for task, metrics in first.items():
        for metric in (m for m in metrics if not m.endswith("_stderr")):
            cells = []
            for column in columns:
                got = scores.get(column, {}).get(task, {})
                value, stderr = got.get(metric), got.get(f"{metric}_stderr")
                cells.append(_fmt(value, 3) + (f" ± {stderr:.3f}" if isinstance(stderr, float) else ""))
            rows.append((f"lm_eval {task} {metric}", *cells))
    return rows


def markdown_table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console_table(report: dict) -> str:
    header, rows = summary_rows(report)
    width = max(len(r[0]) for r in rows)
    lines = [f"{header[0]:<{width}}" + "".join(f"  {h:>14}" for h in header[1:])]
    lines += [f"{row[0]:<{width}}" + "".join(f"  {c:>14}" for c in row[1:]) for row in rows]
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())
    written = "final" if report.get("eval", {}).get("final") else "pruned"
    lines += [f"time: {timings}", f"written: {report['output_dir']}/{written} ({report['architecture_written']})"]
    return "\n".join(lines)


def _removed_layers_line(report: dict) -> list[str]:
    if not report.get("removed_layers"):
        return []
    depth = report["depth"]
    types = depth.get("removed_types")
    listed = ", ".join(f"{i} ({ty})" for i, ty in zip(report["removed_layers"], types)) if types else \
        str(report["removed_layers"])
    return [f"Removed layers (method {depth['method']}, metric {depth.get('metric')}): {listed}", ""]


def report_markdown(report: dict) -> str:
    header, rows = summary_rows(report)
    parts = [f"# llmprune report: {report['recipe']}", "",
             f"Model: {report['model']} (family {report['family']}); importance: {report.get('importance')}", "",
             markdown_table(header, rows), ""]
    parts += _removed_layers_line(report)
    parts += [f"Architecture written: {report['architecture_written']}", ""]
    if "gradnas" in report:
        g = report["gradnas"]
        parts += ["GradNAS search space profile:", "", g["profile"], "",
                  f"Rule {g['rule']}: kept {g['kept_score'] / g['total_score']:.1%} of the score mass. Effective "
                  f"(real per-layer shapes, the ONNX file): params {g['effective']['params']:,}, FLOPs "
                  f"{g['effective']['flops']:,}; physical (the stock config written, removed units zero-filled): "
                  f"params {g['physical']['params']:,}, FLOPs {g['physical']['flops']:,}.", ""]
    if "search" in report:
        parts += search_markdown(report["search"])
    for name, check in report.get("export_check", {}).items():
        if "physical_params" in check:  # per-layer (GradNAS) export
            parts += [f"Export check ({name}/): stock transformers reloads it as {check['architecture']}; max |output "
                      f"difference| {check['max_abs_diff_stock_reload']:.2e}; parameters physical "
                      f"{check['physical_params']:,} (zero-filled units included), effective "
                      f"{check['effective_params']:,}" + (f"; {check['onnx']}" if check["onnx"] else "") + ".", ""]
            continue
        parts += [f"Export check ({name}/): stock transformers reloads it as {check['reloaded_class']}; max |logit "
                  f"difference| {check['max_abs_logit_diff']:.2e}.", ""]
    distill = report["distill"]
    line = f"Distillation: {distill['status']}"
    if "seconds_per_step" in distill:
        line += (f" ({distill['seconds_per_step']} s/step, losses {distill['losses']}); curves: curves.png, "
                 "metrics: distill_metrics.jsonl")
    parts.append(line)
    parts += ["", "Time per stage (s):", "", markdown_table(("stage", "seconds"), report["timings_s"].items()), ""]
    if "hub" in report:
        parts += [f"Pushed to {report['hub']['url']}", ""]
    return "\n".join(parts)


def search_markdown(search: dict) -> list[str]:
    """The architecture search: the profile, the pick and runners-up, the score's noise and every scored candidate."""
    def number(value, digits: int = 4) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = ["## Architecture search", "", "Search space profile:", "", search["profile"], "",
             f"Objectives {search['objectives']}; {search['space_size']:,} grid points"
             + (f", {search['candidates_within_budget']:,} within every bound" if "candidates_within_budget" in search
                else "") + f"; {search['scores_taken']} scores taken in {search['seconds']:.0f} s "
             f"({search['scores_per_minute']} per minute); search.csv lists every scored candidate.", "",
             f"Pick: `{search['pick']}`" + (f" ({search['pick_rule']} of the Pareto front, search/front.png)"
                                           if "pick_rule" in search else "")
             + (f"; runners-up: {', '.join(f'`{k}`' for k in search['runners_up'])}" if search.get("runners_up")
                else "") + ".", ""]
    if "noise" in search:
        pruned, distilled = search["noise"]["pruned"], search["noise"]["distilled"]
        lines += [f"Noise (each score on two disjoint held-out halves): pruned KL gap "
                  f"{number(pruned['mean_relative_gap'], 3)} relative, halves' rank correlation "
                  f"{number(pruned['halves_spearman'], 3)}; distilled KL gap "
                  f"{number(distilled['mean_relative_gap'], 3)}. Rank correlation pruned-only vs distilled "
                  f"(finalists): {number(search['rank_correlation'], 3)}.",
                  ""]
    columns = [c for c in ("key", "params", "flops", "memory", "latency", "pruned_kl", "distilled_kl")
               if any(c in row for row in search["scored"])]
    rows = [[row["key"] if c == "key" else number(row.get(c), 4 if "kl" in c else 0) for c in columns]
            for row in search["scored"]]
    return lines + [markdown_table(tuple(columns), rows), ""]


def model_card(report: dict) -> str:
    """README.md of an exported directory: where the model came from and how it was made."""
    header, rows = summary_rows(report)
    stage = report.get("stage", "pruned")
    distill = report["distill"]
    made = "pruned" if stage == "pruned" else f"pruned and distilled ({distill['status']}, losses {distill['losses']})"
    return "\n".join([
        "---", "library_name: transformers", "tags: [llmprune, pruning, minitron, distillation]",
        f"base_model: {report['model'].split(' ')[0]}", "---", "",
        f"# {report['model'].split(' ')[0]}, {made}", "",
        f"Teacher: {report['model']}. Made with llmprune, recipe `{report['recipe']}`, importance "
        f"`{report.get('importance', 'activation')}` (Minitron activation importance when `activation`). Loads with "
        "stock `AutoModelForCausalLM.from_pretrained`.", "",
        markdown_table(header, rows), "",
        f"Architecture: {report.get('architecture_written', '-')}.", "",
        *_removed_layers_line(report),
        f"Calibration: {report['data']['calibration_tokens']:,} tokens of {report['data']['source']} text. "
        f"Evaluation: {report['data']['heldout_tokens']:,} held-out tokens that calibration and distillation never "
        f"saw. Distillation token budget: {distill.get('tokens', 0):,}. `pruning_plan.json` lists the target sizes "
        "and the kept indices of every dimension.", ""])


def eval_series(history: list[dict], pruned: dict | None = None) -> dict[str, tuple[list, list]]:
    """(tokens, values) of the held-out perplexity and KL to the teacher, both starting at the pruned model's
    numbers (token 0) when `pruned` holds them."""
    evals = [r for r in history if r.get("eval_perplexity") is not None]
    out = {}
    for key, start in (("eval_perplexity", "perplexity"), ("eval_kl", "kl_to_teacher")):
        points = [(r["tokens"], r[key]) for r in evals if r.get(key) is not None]
        if (pruned or {}).get(start) is not None:
            points = [(0, pruned[start])] + points
        out[key] = ([t for t, _ in points], [v for _, v in points])
    return out


def plot_curves(history: list[dict], path: Path, pruned: dict | None = None) -> None:
    """PNG with the training loss and the held-out perplexity / KL against distillation tokens (both from the
    pruned model's numbers at token 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["tokens"] for r in history]
    left.plot(tokens, [r["loss"] for r in history], label="total loss")
    for part in sorted({k for r in history for k in r} & {"kl", "reverse_kl", "topk_kl", "hidden", "lm"}):
        left.plot(tokens, [r.get(part) for r in history], label=part, alpha=0.7)
    left.set(xlabel="distillation tokens", ylabel="training loss", title="training")
    left.legend()
    series = eval_series(history, pruned)
    right.plot(*series["eval_perplexity"], marker="o", label="held-out perplexity")
    right.set(xlabel="distillation tokens", ylabel="perplexity", title="held-out evaluation", yscale="log")
    if series["eval_kl"][0]:
        kl_axis = right.twinx()
        kl_axis.plot(*series["eval_kl"], color="tab:red", marker=".", label="KL to teacher")
        kl_axis.set_ylabel("KL to teacher (nats/token)")
        kl_axis.legend(loc="lower right")
    right.legend(loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_report(run_dir: Path, report: dict) -> None:
    for name, content in (("report.json", json.dumps(report, indent=1)), ("report.md", report_markdown(report))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(run_dir / name)
