"""Simple channel rankings to compare Minitron against, in the same named-score format.

magnitude: L2 norm of the weights a unit owns (rows it writes, columns it reads).
taylor: first-order Taylor importance |sum over a unit's weights of w * dLoss/dw|, summed over batches
    (Molchanov et al., arXiv:1906.10771), from the LM loss on the calibration batches.
random: uniform random scores (seeded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.distributed import all_reduce_sum
from llmprune.progress import progress


def _unit_reduce(module: nn.Module, side, values: torch.Tensor) -> torch.Tensor:
    """Per-unit sums over a weight-shaped tensor: rows for 'out' (all other dims summed, so a conv filter is one
    unit), rows start..stop for ('out', start, stop) (one part of a fused projection), columns for 'in' / 'emb'."""
    if isinstance(side, tuple):
        _, start, stop = side
        return values[start:stop].flatten(1).sum(dim=1)
    return values.flatten(1).sum(dim=1) if side == "out" else values.sum(dim=0)


def _scores_from(adapter, per_weight, per_channel=None) -> dict[str, torch.Tensor]:
    """Per-unit sums of `per_weight`, then `per_channel` on each channel's total (before heads are derived)."""
    raw = {}
    for name, owners in adapter.prunable_weights().items():
        total = None
        for module, side in owners:
            value = _unit_reduce(module, side, per_weight(module)).float().cpu()
            total = value if total is None else total + value
        raw[name] = total if per_channel is None else per_channel(total)
    # `hidden` is already the global channel score; derive_scores also adds heads.{i}
    hidden = raw.pop("hidden")
    scores = adapter.derive_scores(raw)
    scores["hidden"] = hidden
    return scores


def magnitude_scores(adapter) -> dict[str, torch.Tensor]:
    # sqrt per channel first: a head's score (L2 over its channels) is then the norm of all weights it owns
    return _scores_from(adapter, lambda m: m.weight.detach().float().square(), torch.sqrt)


@torch.enable_grad()  # callers may hold no_grad
def taylor_scores(model, adapter, batches) -> dict[str, torch.Tensor]:
    """Taylor scores from the next-token loss over real tokens (padding masked out of the loss and the attention).

    Only the scored weights take gradients, and only for the duration: the pipeline's teacher is frozen
    (requires_grad False), and a frozen model's loss would have no graph to differentiate.
    """
    groups = adapter.prunable_weights()
    weights = list({id(m.weight): m.weight for owners in groups.values() for m, _ in owners}.values())
    flags = [w.requires_grad for w in weights]
    totals: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in progress(batches, desc="taylor"):
            model.zero_grad(set_to_none=True)
            ids = batch.input_ids.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, S-1)
            valid = torch.ones_like(nll) if mask is None else mask[:, 1:].float()
            ((nll * valid).sum() / valid.sum().clamp_min(1)).backward()
            with torch.no_grad():
                for name, owners in groups.items():
                    unit = sum(_unit_reduce(m, side, m.weight.float() * m.weight.grad.float()) for m, side in owners)
                    totals[name] = totals.get(name, 0) + unit.abs()  # |first-order loss change| per unit and batch
    finally:
        model.zero_grad(set_to_none=True)
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    raw = {name: all_reduce_sum(value).cpu() for name, value in totals.items()}
    hidden = raw.pop("hidden")
    scores = adapter.derive_scores(raw)
    scores["hidden"] = hidden
    return scores


def random_scores(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return _scores_from(adapter, lambda m: torch.rand(m.weight.shape, generator=gen))


def baseline_scores(method: str, model, adapter, batches, seed: int = 0) -> dict[str, torch.Tensor]:
    if method == "magnitude":
        return magnitude_scores(adapter)
    if method == "taylor":
        return taylor_scores(model, adapter, batches)
    if method == "random":
        return random_scores(adapter, seed)
    raise ValueError(f"Unknown prune.importance '{method}'. Known: activation, magnitude, taylor, random.")
