"""Minitron activation importance: one calibration pass with hooks, forward only.

For every scored activation A[b, s, c] each batch adds sum_b (mean_s |A[b, s, c]|)^2 (mean over real tokens
only, so padding never enters a score) and the final score is the square root: an L2 over samples of the
per-sample mean magnitude (Minitron, arXiv:2407.14679 Sec. 2.2). Sums are float32 and are all-reduced across
ranks under torchrun, so every rank builds the same plan. Block Importance (1 - cosine between a layer's input
and output hidden states, ShortGPT arXiv:2403.03853) comes from the same pass. Under pipeline parallelism each stage
scores its own layers; the adapter's derive_scores and a sum over the stages give every rank every layer's scores.

Score names (all plain tensors, saved in importance.safetensors):
  ffn.{i} (ffn,), attn.{i} (heads * head_dim,), heads.{i} (heads,), hidden.{i}.{norm} (hidden,), hidden (hidden,),
  mamba.{i} (mamba heads * mamba head_dim,), mamba_heads.{i} (mamba heads,), mamba_head_dim.{i} (mamba head_dim,),
  block_importance (layers,), depth.drop_one.{metric} (layers,), depth.contiguous.{metric}.n{k} (layers - k + 1,).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from llmprune.data import Batch
from llmprune.distributed import all_reduce_sum, layer_stages
from llmprune.progress import progress


class ActivationScores:
    """Accumulates sum_b (mean_s |A|)^2 per named site, masking padding.

    `group`: the process group the sums are all-reduced over (None: every rank; see distributed.data_shard).
    """

    def __init__(self, group=None):
        self.sums: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # (B, S) of the current batch; None when it has no padding
        self.group = group
        self.paused = False  # hooks stay registered but add nothing (streaming runs depth samples through them)

    def add(self, name: str, act: torch.Tensor) -> None:
        if self.paused:
            return
        act = act.detach()  # (B, S, C)
        if self.mask is None:
            # abs().sum() rather than linalg.vector_norm(ord=1, dim=1): the same float32 sums, but 3-7x faster on
            # CPU for a reduction over the sequence dim, which kept calibration well under a plain forward's speed
            mean_abs = act.abs().sum(1, dtype=torch.float32) / act.shape[1]  # (B, C)
        else:
            weight = self.mask.to(torch.float32).unsqueeze(-1)  # (B, S, 1)
            mean_abs = (act.float().abs() * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        contribution = mean_abs.square().sum(0)  # (C,)
        if name in self.sums:
            self.sums[name] += contribution
        else:
            self.sums[name] = contribution

    def finalize(self) -> dict[str, torch.Tensor]:
        return {name: all_reduce_sum(total, self.group).sqrt().cpu() for name, total in self.sums.items()}


def _hook_sites(sites, stats: ActivationScores, seq_first: bool = False) -> list:
    """`seq_first`: the model's activations are (S, B, C) (megatron-core), not (B, S, C)."""
    handles = []
    for site in sites:
        def add(act, name=site.name, channels=site.channels):
            act = act.transpose(0, 1) if seq_first else act  # (B, S, C)
            stats.add(name, act if channels is None else act[..., channels[0]: channels[1]])

        if site.capture == "input":
            handles.append(site.module.register_forward_pre_hook(lambda mod, args, add=add: add(args[0])))
        else:
            handles.append(site.module.register_forward_hook(
                lambda mod, args, out, add=add: add(out[0] if isinstance(out, tuple) else out)))
    return handles


def _hook_block_importance(layers, layer_ids, totals: torch.Tensor, stats: ActivationScores,
                           seq_first: bool = False) -> list:
    """Adds sum over real tokens of (1 - cos(x_in, x_out)) per layer into totals[i] (i: the layer's global index)."""

    def hook(i):
        def fn(mod, args, kwargs, out):
            if stats.paused:
                return
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            dissimilarity = 1.0 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            if seq_first:
                dissimilarity = dissimilarity.transpose(0, 1)  # (S, B) -> (B, S)
            if stats.mask is not None:
                dissimilarity = dissimilarity * stats.mask
            totals[i] += dissimilarity.sum()
        return fn

    return [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in zip(layer_ids, layers)]


@torch.no_grad()
def activation_scores(model, adapter, batches: Iterable[Batch], total: int | None = None) -> dict[str, torch.Tensor]:
    """One calibration pass: Minitron channel scores for every site of `adapter` plus Block Importance.

    The LM head is skipped (nothing is scored there), so the pass runs the backbone only (every pipeline stage its
    part of it).
    """
    group = getattr(adapter, "data_parallel_group", None)  # megatron TP / PP: ranks of one model share their samples
    seq_first = getattr(adapter, "seq_first", False)
    stages = layer_stages(adapter)
    stats = ActivationScores(group)
    device = next(model.parameters()).device
    bi_totals = torch.zeros(stages.num_layers, dtype=torch.float32, device=device)  # this stage fills its layers
    tokens = torch.zeros((), dtype=torch.float32, device=device)
    handles = _hook_sites(adapter.importance_sites(), stats, seq_first)
    handles += _hook_block_importance(adapter.layers, stages.layer_ids, bi_totals, stats, seq_first)
    was_training = model.training
    model.eval()
    try:
        for batch in progress(batches, total=total, desc="calibrate"):
            input_ids = batch.input_ids.to(device)
            mask = batch.attention_mask
            stats.mask = None if mask is None or bool(mask.all()) else mask.to(device)
            tokens += input_ids.numel() if stats.mask is None else stats.mask.sum()
            adapter.backbone(input_ids=input_ids, attention_mask=None if mask is None else mask.to(device),
                             use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    scores = adapter.derive_scores(stats.finalize())
    block_importance = all_reduce_sum(bi_totals, group) / all_reduce_sum(tokens, group)
    scores["block_importance"] = stages.sum(block_importance).cpu()
    return scores


def summarize(scores: dict[str, torch.Tensor]) -> dict[str, dict]:
    """A small JSON-able summary for plan.json: per score family, count and value range."""
    families: dict[str, list[torch.Tensor]] = {}
    for name, value in sorted(scores.items()):  # fixed order: a reloaded file must summarize identically
        family = name.split(".")[0] if not name.startswith("depth.") else name
        families.setdefault(family, []).append(value.float().flatten())
    out = {}
    for family, values in sorted(families.items()):
        flat = torch.cat(values)
        out[family] = {"vectors": len(values), "min": round(float(flat.min()), 6),
                       "mean": round(float(flat.mean()), 6), "max": round(float(flat.max()), 6)}
    return out
