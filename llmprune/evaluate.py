"""Held-out perplexity and KL(teacher || student) per token."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from llmprune.data import Batch
from llmprune.distill.losses import LOSS_CHUNK_BYTES, head_chunks
from llmprune.distributed import all_reduce_sum
from llmprune.progress import progress


def predicting_positions(ids: torch.Tensor) -> torch.Tensor:
    """Positions 0 .. S-2, the ones that predict a next token, as a model's `logits_to_keep`: the LM head then skips
    the last position and its logits come out contiguous, with no (B, S-1, V) slice copy forward and backward."""
    return torch.arange(ids.shape[1] - 1, device=ids.device)


@torch.no_grad()
def evaluate(model, batches: Iterable[Batch], teacher=None, desc: str = "evaluate",
             chunk_bytes: int = LOSS_CHUNK_BYTES, reduce: bool = True) -> dict[str, float]:
    """Token-mean next-token loss, its perplexity, and (with a teacher) the mean KL(teacher || model) in nats.

    Padding (attention_mask 0) never counts; sums are all-reduced across ranks. The per-token losses run on chunks
    of positions of at most `chunk_bytes` of float32 logits, so the only (B, S-1, V) tensors are the two models'
    logits themselves, not their float32 copies, log-probabilities and products. `reduce=False` keeps this process's
    sums (a rank scoring a model no other rank runs, as the search does with its share of the candidates).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, kl, tokens
    for batch in progress(batches, desc=desc):
        ids = batch.input_ids.to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        keep = predicting_positions(ids)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        t_logits = None
        if teacher is not None:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        labels = ids[:, 1:].reshape(-1)  # (N,), N = B * (S-1)
        valid = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask[:, 1:].reshape(-1).float()
        for rows in head_chunks(len(labels), logits.shape[-1], chunk_bytes):
            s = logits.flatten(0, 1)[rows].float()  # (n, V)
            nll = F.cross_entropy(s, labels[rows], reduction="none")
            totals[0] += (nll * valid[rows]).sum().double()
            if t_logits is not None:
                t_logprobs = F.log_softmax(t_logits.flatten(0, 1)[rows].float(), dim=-1)
                kl = (t_logprobs.exp() * (t_logprobs - F.log_softmax(s, dim=-1))).sum(-1)  # (n,)
                totals[1] += (kl * valid[rows]).sum().double()
        totals[2] += valid.sum().double()
    model.train(was_training)
    nll, kl, tokens = (all_reduce_sum(totals) if reduce else totals).tolist()
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if teacher is not None:
        result["kl_to_teacher"] = kl / tokens
    return result
