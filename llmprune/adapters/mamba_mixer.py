"""Mamba-2 mixer surgery shared by the mamba2 and nemotron_h adapters.

transformers' Mamba2Mixer and NemotronHMamba2Mixer hold the same parameters in the same layout
(I = heads * head_dim, G = n_groups, N = state size, every per-channel vector head-major: channel h * head_dim + p):
  in_proj   (2I + 2GN + H, hidden) output rows [z (I) | x (I) | B (GN) | C (GN) | dt (H)]
  conv1d    depthwise over [x | B | C] (I + 2GN channels)
  A_log, D, dt_bias (H,)
  norm      gated RMSNorm, weight (I,): y * silu(z), normalized over G groups of I / G channels each
  out_proj  (hidden, I)
Head h reads B / C group h // (H / G), and norm group g covers exactly the heads of B / C group g, so keeping the
same number of heads in every group keeps both groupings aligned. B, C and the state size are never pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.pruning.map import Rule

IN_PROJ_ROWS = ("m_inner", "m_inner", None, "m_heads")  # [z | x | B C | dt]; B, C and the state size stay whole
CONV_CHANNELS = ("m_inner", None)  # [x | B C]


def mixer_rules(prefix: str) -> tuple[Rule, ...]:
    """The pruning map of one Mamba-2 mixer (`prefix` ends in "mixer.")."""
    p = prefix
    return (
        Rule(p + "in_proj.weight", (IN_PROJ_ROWS, "hidden"), matmul=True),
        Rule(p + "in_proj.bias", (IN_PROJ_ROWS,)),
        Rule(p + "conv1d.weight", (CONV_CHANNELS,)),  # (channels, 1, kernel): depthwise
        Rule(p + "conv1d.bias", (CONV_CHANNELS,)),
        Rule(p + "A_log", ("m_heads",), kind="ssm"),
        Rule(p + "D", ("m_heads",)),
        Rule(p + "dt_bias", ("m_heads",)),
        Rule(p + "norm.weight", ("m_inner",), scale="gated"),
        Rule(p + "out_proj.weight", ("hidden", "m_inner"), scale="residual", matmul=True),
        Rule(p + "out_proj.bias", ("hidden",), scale="residual"),
    )


def x_channels(mixer: nn.Module) -> tuple[int, int]:
    """(start, stop) of the x part in in_proj's output: Minitron scores Mamba heads and head dim there."""
    inner = mixer.num_heads * mixer.head_dim
    return inner, 2 * inner


def derive_mamba_scores(raw: dict[str, torch.Tensor], head_dims: dict[int, tuple[int, int]]) -> dict:
    """`mamba_heads.{i}` and `mamba_head_dim.{i}` from the x-part channel scores `mamba.{i}` (DESIGN.md).

    A head's score is the L2 norm over its head_dim channels; a head-dim index's score is the L2 norm over the
    heads, so one ranking of head-dim channels serves every head of the layer.

    Args:
        raw: per-site channel scores; `mamba.{i}` has heads * head_dim entries, head-major.
        head_dims: per Mamba layer i, (heads, head_dim).
    """
    scores = {}
    for i, (heads, head_dim) in head_dims.items():
        if f"mamba.{i}" in raw:
            per_channel = raw[f"mamba.{i}"].float().view(heads, head_dim)  # (H, P)
            scores[f"mamba_heads.{i}"] = per_channel.norm(dim=1)
            scores[f"mamba_head_dim.{i}"] = per_channel.norm(dim=0)
    return scores


def prunable_weights(mixer: nn.Module) -> tuple[list, list]:
    """(owners of the x channels `mamba.{i}`, owners of the hidden channels) for weight-based baselines.

    A channel owns its z and x rows of in_proj, its conv1d filter and its out_proj column; ('out', start, stop)
    names the rows start..stop of a fused weight.
    """
    inner = mixer.num_heads * mixer.head_dim
    channels = [(mixer.in_proj, ("out", 0, inner)), (mixer.in_proj, ("out", inner, 2 * inner)),
                (mixer.conv1d, ("out", 0, inner)), (mixer.out_proj, "in")]
    hidden = [(mixer.in_proj, "in"), (mixer.out_proj, "out")]
    return channels, hidden


