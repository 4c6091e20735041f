"""The GradNAS stages (prune.mode=gradnas): scores, the pruned model with real per-layer shapes, the encoder's
held-out evaluation and distillation loss, and the exported directory.

Decoders (GPT-J) are judged and distilled as every causal LM is (evaluate.py, distill/train.py); an encoder is judged by
its sentence embeddings on held-out windows: the cosine to the original's embedding of the same text, and top-1
retrieval of each window's second half from its first half among all held-out windows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from llmprune import data as text
from llmprune.data import Batch
from llmprune.errors import ConfigError
from llmprune.importance.gradnas import SITES, contrastive_pairs, gradnas_scores, mean_pooled
from llmprune.pruning.map import axis_index, kept_spaces, space_sizes
from llmprune.stages.calibration import cached_scores, save_scores


def is_encoder(model: nn.Module) -> bool:
    return not getattr(model.config, "is_decoder", False) and model.config.model_type == "bert"


def resolve_gradnas_loss(loss: str, model: nn.Module) -> str:
    """prune.gradnas.loss=auto: mlm for a masked LM, contrastive for a bare encoder, causal_lm for a decoder."""
    if model.config.model_type not in SITES:
        raise ConfigError(f"prune.mode=gradnas does not support the '{model.config.model_type}' family; it prunes "
                          f"{', '.join(sorted(SITES))} (use prune.mode=minitron for Mamba and hybrid models).")
    if loss != "auto":
        return loss
    if not is_encoder(model):
        return "causal_lm"
    return "mlm" if type(model).__name__.endswith("ForMaskedLM") else "contrastive"


def score_stage(gradnas: DictConfig, loss: str, batch_size: int, seed: int, model, tokenizer, calib: torch.Tensor,
                path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """GradNAS scores of every head and FFN neuron, cached in `path` under `fingerprint`."""
    scores = cached_scores(path, fingerprint)
    if not scores:
        scores = gradnas_scores(model, text.to_batches(calib, batch_size), loss, tokenizer, seed)
        save_scores(scores, path, fingerprint)
    return scores


@torch.no_grad()
def into_original_shapes(original: nn.Module, pruned: nn.Module, pmap, plan) -> nn.Module:
    """A copy of `original` holding `pruned`'s weights at the kept positions (the removed units keep the original's
    values; the export zeroes them). The inverse of slicing by the pruning map, so a distilled model with per-layer
    shapes can be written in a stock config's shapes."""
    out = copy.deepcopy(original)
    state = out.state_dict()
    sizes = space_sizes(plan.original)
    for name, value in pruned.state_dict().items():
        target = state.get(name)
        if target is None:  # a module the pruned model replaced (a BERT attention that keeps no head)
            continue
        if target.shape == value.shape:
            target.copy_(value)
            continue
        rule, layer = pmap.rule_for(name)
        spaces = kept_spaces(plan, layer)
        index = [axis_index(rule.axes[d] if d < len(rule.axes) else None, n, spaces, sizes) or list(range(n))
                 for d, n in enumerate(target.shape)]
        grid = torch.meshgrid(*(torch.as_tensor(i, dtype=torch.long) for i in index), indexing="ij")
        target[grid] = value.to(target.dtype)
    return out


# -- encoders: evaluation and distillation -------------------------------------------------------------------------


def _special(tokenizer) -> tuple[int | None, int | None]:
    return getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)


def _wrapped(ids: torch.Tensor, tokenizer) -> Batch:
    """Whole windows with [CLS] ... [SEP], as the encoder saw text in training."""
    cls, sep = _special(tokenizer)
    mask = torch.ones_like(ids)
    if cls is None or sep is None:
        return Batch(ids, mask)
    rows = ids.shape[0]
    return Batch(torch.cat([ids.new_full((rows, 1), cls), ids, ids.new_full((rows, 1), sep)], 1),
                 torch.cat([mask.new_ones(rows, 1), mask, mask.new_ones(rows, 1)], 1))


@torch.no_grad()
def embed(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """(N, H) L2-normalised mean-pooled embeddings."""
    was_training = model.training
    model.eval()
    out = torch.cat([F.normalize(mean_pooled(model, b).float(), dim=-1).cpu() for b in batches])
    model.train(was_training)
    return out


def retrieval_top1(model: nn.Module, windows: torch.Tensor, tokenizer, batch_size: int) -> float:
    """Share of held-out windows whose second half is the nearest (cosine) of all second halves to its first."""
    pairs = [contrastive_pairs(Batch(windows[i: i + batch_size]), *_special(tokenizer))
             for i in range(0, len(windows), batch_size)]
    anchors, positives = embed(model, [a for a, _ in pairs]), embed(model, [p for _, p in pairs])
    hits = (anchors @ positives.T).argmax(dim=1) == torch.arange(len(windows))
    return hits.float().mean().item()


def evaluate_encoder(model: nn.Module, windows: torch.Tensor, tokenizer, batch_size: int,
                     teacher: nn.Module | None = None) -> dict[str, float]:
    """Held-out retrieval top-1 and (with a teacher) the mean cosine between the two models' embeddings."""
    result = {"retrieval_top1": retrieval_top1(model, windows, tokenizer, batch_size)}
    if teacher is not None:
        batches = [_wrapped(windows[i: i + batch_size], tokenizer) for i in range(0, len(windows), batch_size)]
        result["cosine_to_teacher"] = (embed(model, batches) * embed(teacher, batches)).sum(-1).mean().item()
    return result


def encoder_distill_loss(teacher: nn.Module, tokenizer, kind: str = "cosine", hidden_weight: float = 0.0):
    """(student, input_ids) -> (loss, parts): 1 - cosine (or MSE) between the student's and the teacher's pooled
    embeddings of each window, plus `hidden_weight` x the MSE of every layer's hidden states (the hidden size is
    unchanged, so no projection)."""

    def compute(student: nn.Module, ids: torch.Tensor):
        batch = _wrapped(ids, tokenizer)
        device = next(student.parameters()).device
        kwargs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
                  "output_hidden_states": bool(hidden_weight)}
        with torch.no_grad():
            t_out = teacher.base_model(**kwargs)
        s_out = student.base_model(**kwargs)
        weights = kwargs["attention_mask"].unsqueeze(-1).float()

        def pool(hidden):
            return (hidden.float() * weights).sum(1) / weights.sum(1)

        s, t = pool(s_out.last_hidden_state), pool(t_out.last_hidden_state)
        embedding = (1 - F.cosine_similarity(s, t, dim=-1)).mean() if kind == "cosine" else F.mse_loss(s, t)
        parts = {"embedding": embedding}
        total = embedding
        if hidden_weight:
            hidden = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in
                                  zip(s_out.hidden_states[1:], t_out.hidden_states[1:], strict=True)]).mean()
            parts["hidden"] = hidden
            total = total + hidden_weight * hidden
        return total, {k: v.detach() for k, v in parts.items()}

    return compute


# -- export --------------------------------------------------------------------------------------------------------


def export_gradnas(name: str, teacher: nn.Module, student: nn.Module, pmap, plan, tokenizer, source_dir: str | None,
                   run_dir: Path, report: dict) -> dict:
    """run_dir/<name>: stock-loadable directory (+ sentence-transformers files, onnx/model.onnx for BERT) of the
    per-layer pruned `student`, checked: the stock reload's outputs equal the student's on a probe."""
    from llmprune.export.encoder import write_encoder_export

    shaped = into_original_shapes(teacher, student, pmap, plan)
    info = write_encoder_export(shaped, plan.heads, plan.ffn, run_dir / name, source_dir=source_dir,
                                tokenizer=tokenizer)
    info["max_abs_diff_stock_reload"] = stock_reload_difference(run_dir / name, student, info)
    report.setdefault("export_check", {})[name] = info
    report["architecture_written"] = (f"{info['architecture']} (stock config; FFN {info['ffn_width_written']} wide, "
                                      "removed heads and neurons zero-filled)" + (", onnx/model.onnx" if info["onnx"]
                                                                                  else ""))
    return info


@torch.no_grad()
def stock_reload_difference(folder: Path, model: nn.Module, info: dict) -> float:
    """Max |difference| between the stock reload of `folder` and `model` on a probe (last hidden state for an
    encoder, logits for a decoder)."""
    import transformers

    model_dir = folder
    modules = folder / "modules.json"
    if modules.exists():  # sentence-transformers: the Transformer module's folder
        import json

        entries = json.loads(modules.read_text())
        model_dir = folder / next(m["path"] for m in entries if m["type"].endswith("Transformer"))
    reloaded = getattr(transformers, info["architecture"]).from_pretrained(model_dir).eval()
    probe = torch.arange(5, 21).view(1, 16) % model.config.vocab_size
    mine, theirs = model.eval()(input_ids=probe), reloaded(input_ids=probe)
    key = "logits" if hasattr(mine, "logits") and mine.logits is not None else "last_hidden_state"
    return (getattr(mine, key).float() - getattr(theirs, key).float()).abs().max().item()
