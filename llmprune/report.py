"""report.json, report.md, the model card and the end-of-run summary table."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(quantity, before, after) rows shared by the console table, report.md and the model card."""
    o, t, ev = report["original"], report["target"], report.get("eval", {})
    rows = [("parameters", _fmt_params(report["params"]["before"]), _fmt_params(report["params"]["after"]))]
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        rows.append((key, str(o[key]), str(t[key])))
    if ev:
        rows.append(("held-out perplexity", _fmt(ev["teacher"]["perplexity"]), _fmt(ev["pruned"]["perplexity"])))
        rows.append(("KL to original (nats/token)", "0", _fmt(ev["pruned"].get("kl_to_teacher"), 4)))
    return rows


def markdown_table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console_table(report: dict) -> str:
    rows = summary_rows(report)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>14}  {'after':>14}"]
    lines += [f"{q:<{width}}  {b:>14}  {a:>14}" for q, b, a in rows]
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())
    lines += [f"time: {timings}", f"written: {report['output_dir']}/pruned ({report['architecture_written']})"]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    parts = [f"# llmprune report: {report['recipe']}", "",
             f"Model: {report['model']} (family {report['family']})", "",
             markdown_table(("", "before", "after"), summary_rows(report)), ""]
    if report.get("removed_layers"):
        parts += [f"Removed layers (method {report['depth']['method']}): {report['removed_layers']}", ""]
    parts += [f"Architecture written: {report['architecture_written']}", ""]
    if "export_check" in report:
        check = report["export_check"]
        parts += [f"Export check: stock transformers reloads it as {check['reloaded_class']}; max |logit difference| "
                  f"{check['max_abs_logit_diff']:.2e}.", ""]
    parts += [f"Distillation: {report['distill']['status']}", "", "Time per stage (s):", "",
              markdown_table(("stage", "seconds"), report["timings_s"].items()), ""]
    return "\n".join(parts)


def model_card(report: dict) -> str:
    """README.md of the exported directory: where the model came from and how it was made."""
    return "\n".join([
        "---", "library_name: transformers", "tags: [llmprune, pruning, minitron]", "---", "",
        f"# Pruned {report['model']}", "",
        f"Structurally pruned with llmprune (recipe `{report['recipe']}`, Minitron activation importance) from "
        f"{report['model']}. Loads with stock `AutoModelForCausalLM.from_pretrained`.", "",
        markdown_table(("", "original", "pruned"), summary_rows(report)), "",
        f"Architecture: {report['architecture_written']}.", "",
        f"Calibration: {report['data']['calibration_tokens']:,} tokens of {report['data']['source']} text; "
        f"evaluation on {report['data']['heldout_tokens']:,} held-out tokens calibration never saw. "
        f"Distillation: {report['distill']['status']}. `pruning_plan.json` lists the kept indices.", ""])


def write_report(run_dir: Path, report: dict) -> None:
    for name, content in (("report.json", json.dumps(report, indent=1)), ("report.md", report_markdown(report))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(run_dir / name)
