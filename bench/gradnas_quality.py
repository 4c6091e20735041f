"""Usage: python bench/gradnas_quality.py [--distill-steps 60] [--flops 60%]

GradNAS on the real MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, embedded) at a FLOPs budget (FLOPs of one
128-token sequence): the knapsack rule (Kwon et al. 2022) and the threshold rule (ModelOpt's GradNAS) on contrastive
gradient scores, against weight magnitude (each unit's output-projection column norm) cut to the same budget by the
knapsack rule. For each: held-out mean cosine between the original's and the pruned model's sentence embeddings, and
top-1 retrieval (each window's first half finds its second half among all held-out windows), after pruning and
after a short embedding distillation (recipe bert_gradnas's loss: 1 - cosine of the pooled embeddings); ONNX Runtime
latency of the pruned vs the original encoder (same batch, same session options). Data: the recipe's split of the
embedded text (128-token windows; scores on 64 calibration windows, distillation on the head of the stream,
evaluation on the held-out tail, which neither saw). Writes bench/results/gradnas_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from _common import md_table, write_results

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.config.schema import DistillConfig
from llmprune.distill.train import train
from llmprune.export.encoder import export_onnx, physically_pruned
from llmprune.importance.gradnas import gradnas_scores
from llmprune.models import load_model
from llmprune.plan.gradnas import GradNASSpace, gradnas_plan
from llmprune.stages.gradnas import encoder_distill_loss, evaluate_encoder

SEQ, BATCH = 128, 16


def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """Per head the norm of its output-projection columns, per neuron the norm of its FFN output column."""
    scores = {}
    heads = model.config.num_attention_heads
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.output.dense.weight  # (H, heads * head_dim)
        scores[f"heads.{i}"] = attn.view(attn.shape[0], heads, -1).norm(dim=(0, 2)).float()
        scores[f"ffn.{i}"] = layer.output.dense.weight.norm(dim=0).float()
    return scores


def onnx_latency(model, tmp: Path, name: str, ids: torch.Tensor, repeats: int = 20) -> float:
    import onnxruntime

    path = tmp / name / "model.onnx"
    export_onnx(model, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options)
    feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy(),
             "token_type_ids": torch.zeros_like(ids).numpy()}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--flops", default="60%")
    args = parser.parse_args()
    teacher, tokenizer, _ = load_model("embedded:minilm", device="cpu")
    teacher.requires_grad_(False)
    splits = text.split_stream(text.token_stream(text.embedded_documents(), tokenizer), SEQ, 64, 128, 0.1, 0)
    heldout = splits.heldout
    adapter = get_adapter(teacher)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), SEQ)
    bounds = space.profile({"flops": args.flops}).bounds
    start = time.perf_counter()
    grad = gradnas_scores(teacher, text.to_batches(splits.calib, BATCH), "contrastive", tokenizer)
    score_s = time.perf_counter() - start
    variants = {"gradnas knapsack": (grad, "knapsack"), "gradnas threshold": (grad, "threshold"),
                "magnitude (knapsack widths)": (magnitude_scores(teacher), "knapsack")}
    original = evaluate_encoder(teacher, heldout, tokenizer, BATCH)
    rows, payload = [], {"original": original, "bounds": bounds, "score_seconds": score_s, "variants": {}}
    probe = heldout[:BATCH]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_latency = onnx_latency(teacher, tmp, "original", probe)
        cfg = SimpleNamespace(**{**vars(DistillConfig()), "max_steps": args.distill_steps, "micro_batch_size": BATCH,
                                 "global_batch_size": BATCH, "lr": 1e-4, "warmup_steps": 10, "eval_every": 10**9,
                                 "save_every": 10**9, "keep_checkpoints": 1})
        for name, (scores, rule) in variants.items():
            plan = gradnas_plan(adapter.family, space, scores, bounds, rule)
            student = physically_pruned(teacher, plan.heads, plan.ffn)
            pruned = evaluate_encoder(student, heldout, tokenizer, BATCH, teacher)
            student.requires_grad_(True)
            start = time.perf_counter()
            run_dir = tmp / name.replace(" ", "_")
            run_dir.mkdir()
            train(student, splits.train, encoder_distill_loss(teacher, tokenizer), cfg, run_dir, "distill", name)
            distill_s = time.perf_counter() - start
            student.requires_grad_(False)
            distilled = evaluate_encoder(student, heldout, tokenizer, BATCH, teacher)
            latency = onnx_latency(student.base_model, tmp, run_dir.name + "_onnx", probe)
            g = plan.summary["gradnas"]
            payload["variants"][name] = {"pruned": pruned, "distilled": distilled, "heads": g["heads"],
                                         "ffn": g["ffn"], "effective": g["effective"], "onnx_s": latency,
                                         "distill_s": distill_s}
            rows.append([name, f"{g['effective']['flops'] / g['full']['flops']:.1%}",
                         " ".join(map(str, g["heads"])), f"{pruned['cosine_to_teacher']:.3f}",
                         f"{pruned['retrieval_top1']:.3f}", f"{distilled['cosine_to_teacher']:.3f}",
                         f"{distilled['retrieval_top1']:.3f}",
                         f"{distilled['retrieval_top1'] / original['retrieval_top1']:.1%}",
                         f"{latency * 1e3:.1f} ({latency / base_latency:.2f}x)"])
            print(rows[-1], flush=True)
    payload["onnx_original_s"] = base_latency
    md = (f"GradNAS on MiniLM-L6 at {args.flops} of the FLOPs of a {SEQ}-token sequence; {len(heldout)} held-out "
          f"windows (retrieval among all of them); distillation {args.distill_steps} steps of {BATCH} x {SEQ} "
          "tokens.\n\n"
          f"Original: retrieval top-1 {original['retrieval_top1']:.3f}; ONNX Runtime {base_latency * 1e3:.1f} ms per "
          f"batch of {BATCH} x {SEQ}.\n\n"
          + md_table(["method", "FLOPs kept", "heads per layer", "cosine (pruned)", "retrieval (pruned)",
                      "cosine (distilled)", "retrieval (distilled)", "retrieval kept (distilled / original)",
                      "ONNX ms (vs original)"], rows))
    write_results("gradnas_quality", md, payload)


if __name__ == "__main__":
    sys.exit(main())
