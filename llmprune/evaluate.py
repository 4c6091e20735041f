"""Held-out perplexity and KL(teacher || student) per token."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from llmprune.data import Batch
from llmprune.distill.losses import HEAD_CHUNK_BYTES, LOSS_CHUNK_BYTES, chunked_head_loss, head_chunks, output_head
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

    Padding (attention_mask 0) never counts; sums are all-reduced across ranks. Where the models' logits are their
    output layer applied to the last hidden states (`output_head`), the output layer runs on chunks of positions of
    at most HEAD_CHUNK_BYTES of float32 logits and no (B, S-1, V) tensor exists: for SmolLM2 at 4 x 256 tokens that
    spares the two models' ~0.4 GB of logits, which in a distillation came on top of the training state. Other
    models (scaled or soft-capped logits, the search's stand-in teacher holding its logits) run whole and their
    per-token losses in chunks of `chunk_bytes`. `reduce=False` keeps this process's sums (a rank scoring a model no
    other rank runs, as the search does with its share of the candidates).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, kl, tokens
    for batch in progress(batches, desc=desc):
        ids = batch.input_ids.to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        labels = ids[:, 1:].reshape(-1)  # (N,), N = B * (S-1)
        valid = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask[:, 1:].reshape(-1).float()

        chunk_sums = _token_sums(labels, valid)
        sums = _by_output_layer(model, teacher, ids, mask, chunk_sums)
        if sums is None:
            keep = predicting_positions(ids)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            t_logits = None
            if teacher is not None:
                t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            sums = {"nll": 0.0, "kl": 0.0}
            for rows in head_chunks(len(labels), logits.shape[-1], chunk_bytes):
                _, parts = chunk_sums(logits.flatten(0, 1)[rows],
                                      None if t_logits is None else t_logits.flatten(0, 1)[rows], rows)
                sums = {k: sums[k] + parts[k] for k in sums}
        totals[0] += sums["nll"]
        totals[1] += sums["kl"]
        totals[2] += valid.sum().double()
    model.train(was_training)
    nll, kl, tokens = (all_reduce_sum(totals) if reduce else totals).tolist()
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if teacher is not None:
        result["kl_to_teacher"] = kl / tokens
    return result


def _token_sums(labels: torch.Tensor, valid: torch.Tensor):
    """chunk_sums(student logits (n, V), teacher logits (n, V) or None, rows) -> (nll sum, {"nll": it, "kl": the KL
    sum}) over the rows `rows` of the flattened positions, each weighted by `valid`."""

    def chunk_sums(s: torch.Tensor, t: torch.Tensor | None, rows: slice):
        s = s.float()
        nll = (F.cross_entropy(s, labels[rows], reduction="none") * valid[rows]).sum().double()
        kl = torch.zeros((), dtype=torch.float64, device=s.device)
        if t is not None:
            t_logprobs = F.log_softmax(t.float(), dim=-1)
            kl = ((t_logprobs.exp() * (t_logprobs - F.log_softmax(s, dim=-1))).sum(-1) * valid[rows]).sum().double()
        return nll, {"nll": nll, "kl": kl}

    return chunk_sums


def _by_output_layer(model, teacher, ids: torch.Tensor, mask: torch.Tensor | None, chunk_sums) -> dict | None:
    """`chunk_sums` added up over the positions that predict a token, each chunk's logits computed from the last hidden
    states by the output layer (`chunked_head_loss`); None where a model does not compute its logits that way.

    The distillation's student (`Student`, possibly inside DDP or FSDP) takes the chunked loss inside its own forward,
    so a sharded student's forward stays the collective call it must be."""
    inner = getattr(model, "module", model)  # DDP keeps the module in .module
    takes_head_loss = getattr(inner, "takes_head_loss", False)
    head = output_head(inner.model if takes_head_loss else model)
    if head is None:
        return None
    keep = predicting_positions(ids)
    t = None
    if teacher is not None:
        t_head = output_head(teacher)
        if t_head is None:
            return None
        t_out = teacher.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        t = (t_out.last_hidden_state[:, keep].flatten(0, 1), t_head)  # (N, H_teacher)

    def head_loss(hidden: torch.Tensor, output_layer) -> tuple[torch.Tensor, dict]:
        return chunked_head_loss(hidden.flatten(0, 1), output_layer, chunk_sums, teacher=t,
                                 budgets=(HEAD_CHUNK_BYTES, HEAD_CHUNK_BYTES))

    if takes_head_loss:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, head_loss=head_loss).parts
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, keep]
    return head_loss(hidden, head)[1]
