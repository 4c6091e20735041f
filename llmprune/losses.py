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


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al., 2015).

    Computed as the cross entropy from the teacher's distribution minus the teacher's entropy: the same value and
    gradient as the definition, but the student side is one fused log-softmax + soft-target NLL, which keeps a
    distillation step within a few percent of a plain forward + backward (bench/distill_speed.py).
    """
    with torch.no_grad():
        t_log = F.log_softmax(_flat(teacher, temperature), dim=-1)  # (N, V)
        t_prob = t_log.exp()
        entropy = -torch.bmm(t_prob.unsqueeze(1), t_log.unsqueeze(2)).view(-1)  # (N,), without an (N, V) product
    cross = F.cross_entropy(_flat(student, temperature), t_prob, reduction="none")  # (N,)
    return _token_mean((cross - entropy).view(valid.shape), valid) * temperature**2


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


def channel_projection(student_width: int, teacher_width: int, kept_channels: list[int] | None) -> nn.Linear:
    """Learned student -> teacher hidden projection, initialized to put each kept channel back in its place."""
    proj = nn.Linear(student_width, teacher_width, bias=False)
    with torch.no_grad():
        proj.weight.zero_()
        channels = kept_channels if kept_channels is not None else list(range(student_width))
        proj.weight[torch.tensor(channels), torch.arange(student_width)] = 1.0
    return proj
