"""Distillation losses, each a token mean over real (unmasked) positions.

logits are (B, S, V) already shifted to the positions that predict a next token; `valid` is (B, S) of 0/1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _token_mean(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (per_token * valid).sum() / valid.sum().clamp_min(1.0)


def _flat(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) -> float32 (N, V) / T; a view of contiguous float32 logits when T is 1 (no 200 MB copies)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return flat if temperature == 1 else flat / temperature


class _SoftTargetKL(torch.autograd.Function):
    """KL(p || softmax(s)) per row, sum of p * (log p - log_softmax(s)), given log p; its gradient is softmax(s) - p.

    The gradient is written over log_softmax(s) in place and is all backward keeps: one (N, V) tensor, where autograd
    through the formula keeps three. The sum over the vocabulary runs on the difference of the log-probabilities, not
    as a cross entropy minus an entropy, whose float32 rounding errors (~1e-4 of each at 49,152 entries) would not
    cancel in the difference.
    """

    @staticmethod
    def forward(ctx, logits, target_log):  # (N, V) float32 each
        log_q = torch.log_softmax(logits, dim=-1)
        p = target_log.exp()
        per_row = (target_log - log_q).mul_(p).sum(-1)  # (N,)
        ctx.save_for_backward(log_q.exp_().sub_(p))
        return per_row

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(1), None


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al., 2015).

    One fused log-softmax, KL and gradient on the student side (`_SoftTargetKL`), which keeps a distillation step
    within a few percent of a plain forward + backward (bench/distill_speed.py).
    """
    with torch.no_grad():
        t_log = F.log_softmax(_flat(teacher, temperature), dim=-1)  # (N, V)
    per_token = _SoftTargetKL.apply(_flat(student, temperature), t_log)  # (N,)
    return _token_mean(per_token.view(valid.shape), valid) * temperature**2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0):
    """KL(student || teacher): mode seeking (MiniLLM, arXiv:2306.08543)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return _token_mean((s.exp() * (s - t)).sum(-1), valid) * temperature**2


def topk_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, k: int, temperature: float = 1.0):
    """Forward KL restricted to the teacher's top-k tokens, both distributions renormalized over them."""
    top = teacher.float().topk(k, dim=-1).indices  # (B, S, k)
    t = F.log_softmax(teacher.float().gather(-1, top) / temperature, dim=-1)
    s = F.log_softmax(student.float().gather(-1, top) / temperature, dim=-1)
    return _token_mean((t.exp() * (t - s)).sum(-1), valid) * temperature**2


def lm_loss(student: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
    """Next-token cross entropy on the data."""
    # a contiguous (B*S, V) view: cross_entropy over a transposed (B, V, S) tensor is several times slower on CPU
    nll = F.cross_entropy(_flat(student), labels.reshape(-1), reduction="none")
    return _token_mean(nll.view(labels.shape), valid)  # (B, S)


# float32 logits per output-layer matmul and per loss evaluation (170 and 42 positions for a 49,152 vocabulary), chosen
# on SmolLM2 at 4 x 256 tokens: the step is as fast as with full logits, and the loss holds ~0.2 GB at once instead of
# ~1.2 GB (bench/memory_default.py).
HEAD_CHUNK_BYTES = 32 * 2**20
LOSS_CHUNK_BYTES = 8 * 2**20


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer where its logits are exactly `head(base_model(...).last_hidden_state)`, else None.

    Models that scale or soft-cap their logits (Gemma, Cohere, Granite) are left to their own forward.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    post_processed = any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale",
                                                                 "logits_scaling"))
    return head if isinstance(head, nn.Linear) and hasattr(model, "base_model") and not post_processed else None


def head_chunks(rows: int, vocab: int, budget_bytes: int = HEAD_CHUNK_BYTES) -> list[slice]:
    """Row slices of at most `budget_bytes` of float32 logits each (>= 1 row)."""
    size = max(1, budget_bytes // (4 * vocab))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss(hidden @ W.T + b) over row chunks, its gradient taken chunk by chunk in forward.

    Each chunk's logits come from one matmul (large enough to run at full speed), the loss and its gradient then
    run on sub-chunks of a few positions, and the gradient overwrites the logits in place; only one chunk of logits
    exists at a time. What is kept for backward is the gradient itself ((N, H) for the hidden states, (V, H) for W),
    so nothing is recomputed: forward does the head matmul and the two gradient matmuls a plain forward + backward
    would do (the idea of Liger-Kernel's fused linear cross entropy, arXiv:2410.10989). Matmuls run under the
    caller's autocast, as the plain head's would; the gradients of W and b accumulate in their own dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, teacher, budgets):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros_like(weight) if need_weight else None  # (V, H)
        grad_bias = torch.zeros_like(bias) if need_bias else None  # (V,)
        total, parts = hidden.new_zeros((), dtype=torch.float32), {}
        for rows in head_chunks(hidden.shape[0], weight.shape[0], budgets[0]):
            h = hidden[rows]  # (n, H)
            logits = F.linear(h, weight, bias)  # (n, V); forward runs without autograd
            t_logits = None if teacher is None else F.linear(teacher[0][rows], teacher[1].weight, teacher[1].bias)
            for sub in head_chunks(len(h), weight.shape[0], budgets[1]):
                s = logits[sub].detach().requires_grad_()  # (m, V)
                with torch.enable_grad():
                    loss, sub_parts = chunk_loss(s, None if t_logits is None else t_logits[sub],
                                                 slice(rows.start + sub.start, rows.start + sub.stop))
                with torch.autocast(s.device.type, enabled=False):  # backward runs outside autocast, as usual
                    (grad,) = torch.autograd.grad(loss, s, allow_unused=True)  # (m, V)
                logits[sub] = 0 if grad is None else grad  # the chunk's logits become its gradient
                total += loss.detach().float()
                for name, value in sub_parts.items():
                    parts[name] = parts.get(name, 0.0) + value.detach().float()
            del t_logits
            if grad_hidden is not None:
                grad_hidden[rows] = logits @ weight  # under autocast W is cast (and cached) as for the plain head
            if grad_weight is not None:
                if logits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(logits.t(), h)
                else:  # autocast: the low-precision product, summed in W's dtype
                    grad_weight += logits.t() @ h
            if grad_bias is not None:
                grad_bias += logits.sum(0)
        ctx.grads = grad_hidden, grad_weight, grad_bias  # attributes, not saved tensors: backward hands them over
        values = [parts[k] for k in sorted(parts)]
        ctx.mark_non_differentiable(*values)
        return (total, *values)

    @staticmethod
    def backward(ctx, grad_total, *_):
        grads = ctx.grads
        del ctx.grads  # AccumulateGrad then takes a tensor nobody else holds, without copying it
        return (*(None if g is None else g.mul_(grad_total) for g in grads), None, None, None)


def chunked_head_loss(hidden: torch.Tensor, head: nn.Module, chunk_loss, teacher=None,
                      budgets: tuple[int, int] = (HEAD_CHUNK_BYTES, LOSS_CHUNK_BYTES)):
    """A loss of the logits `head(hidden)` computed on chunks of rows, so the full (N, V) logits never exist at once.

    Args:
        hidden: (N, H) inputs of the output layer (the final norm's outputs at the positions that predict a token).
        head: the output layer (an nn.Linear: W (V, H), optional bias).
        chunk_loss: (logits (m, V), teacher logits (m, V) or None, rows: slice) -> (these rows' share of the loss,
            {part: its share}); the shares must add up to the loss over all rows (a token mean: the rows' mean times
            their tokens / all tokens).
        teacher: optional (teacher hidden (N, H_t), teacher output layer): its logits of the same rows, without
            gradient, are computed chunk by chunk alongside.
        budgets: float32 logits per output-layer matmul and per loss evaluation (head_chunks).

    Returns:
        (loss, {part: value}) with the value and gradient of the unchunked computation up to float rounding.
    """
    # in the output layers' dtype, as the models' own forward casts it (Mamba2 keeps its residual stream in float32
    # under bfloat16 weights)
    hidden = hidden.to(head.weight.dtype)
    if teacher is not None:
        teacher = (teacher[0].to(teacher[1].weight.dtype), teacher[1])
    if not torch.is_grad_enabled():  # evaluation: the chunks' losses, no gradients
        shares = []
        for rows in head_chunks(hidden.shape[0], head.weight.shape[0], budgets[1]):
            t = None if teacher is None else F.linear(teacher[0][rows], teacher[1].weight, teacher[1].bias)
            shares.append(chunk_loss(F.linear(hidden[rows], head.weight, head.bias), t, rows))
        return sum(loss for loss, _ in shares), {k: sum(p[k] for _, p in shares) for k in shares[0][1]}
    names = []

    def record_names(logits, t_logits, rows):
        loss, parts = chunk_loss(logits, t_logits, rows)
        if not names:
            names.extend(sorted(parts))
        return loss, parts

    total, *values = _ChunkedHeadLoss.apply(hidden, head.weight, head.bias, record_names, teacher, budgets)
    return total, dict(zip(names, values))


def hidden_state_loss(student_states, teacher_states, projection: nn.Module, valid: torch.Tensor,
                      kind: str = "cosine"):
    """Mean over layer pairs of 1 - cos (or MSE) between projected student and teacher hidden states."""
    losses = []
    for s, t in zip(student_states, teacher_states):
        s = projection(s.float()) if projection is not None else s.float()  # (B, S, H_teacher)
        if kind == "cosine":
            per_token = 1.0 - F.cosine_similarity(s, t.float(), dim=-1)
        else:
            per_token = (s - t.float()).square().mean(-1)
        losses.append(_token_mean(per_token, valid))
    return torch.stack(losses).mean()


def channel_projection(student_width: int, teacher_width: int, kept_channels: list[int] | None,
                       scale: float = 1.0) -> nn.Linear:
    """Learned student -> teacher hidden projection, initialized to put each kept channel back in its place, times
    `scale` (1 / the residual scale of rescaled norms, `pruning.map.residual_scale`: then the student's layer outputs
    start projected onto the teacher's)."""
    proj = nn.Linear(student_width, teacher_width, bias=False)
    with torch.no_grad():
        proj.weight.zero_()
        channels = kept_channels if kept_channels is not None else list(range(student_width))
        proj.weight[torch.tensor(channels), torch.arange(student_width)] = scale
    return proj
