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

from llmprune.slicing import slice_depthwise_conv1d, slice_linear, slice_parameter


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


def count_mixer_params(hidden: int, heads: int, head_dim: int, groups: int, state: int, kernel: int,
                       proj_bias: bool, conv_bias: bool) -> int:
    """Parameters of one Mamba-2 mixer at these sizes."""
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    in_out = inner + conv_dim + heads  # z, xBC, dt
    return (hidden * in_out + proj_bias * in_out  # in_proj
            + conv_dim * kernel + conv_bias * conv_dim  # conv1d
            + 3 * heads  # A_log, D, dt_bias
            + inner  # gated norm
            + inner * hidden + proj_bias * hidden)  # out_proj


@torch.no_grad()
def slice_mixer(mixer: nn.Module, heads: list[int] | None, head_dims: list[int] | None, hidden: list[int] | None,
                rescale_norm: bool = False, eps_scale: float = 1.0) -> None:
    """Keep Mamba `heads`, head-dim channels `head_dims` (shared by all heads) and `hidden` channels, in place.

    The gated norm normalizes groups of I / G channels, so removing heads or head-dim channels shrinks each group
    from n to n' channels. With zeros in the removed channels of its input y * silu(z), the sliced norm computes
    what the original computes with weight * sqrt(n' / n) and epsilon * n' / n. `rescale_norm` multiplies the
    weight by sqrt(n / n'); the epsilon is the config's one `layer_norm_epsilon`, shared with the hidden-size
    norms, and is multiplied by `eps_scale` (the adapter's hidden-width factor), so the rescaled norm equals the
    original with epsilon * eps_scale * n' / n: exact when eps_scale == n / n'.

    Args:
        heads: kept heads, ascending, the same number in every group (None keeps all).
        head_dims: kept head-dim channels, ascending (None keeps all).
        hidden: kept hidden channels (in_proj columns, out_proj rows); None keeps all.
        rescale_norm / eps_scale: see above.
    """
    num_heads, head_dim, groups = mixer.num_heads, mixer.head_dim, mixer.n_groups
    inner, bc = num_heads * head_dim, 2 * groups * mixer.ssm_state_size
    if heads is None and head_dims is None:
        channels = None
    else:
        heads = list(range(num_heads)) if heads is None else heads
        head_dims = list(range(head_dim)) if head_dims is None else head_dims
        assert len(heads) % groups == 0, (len(heads), groups)
        channels = [h * head_dim + p for h in heads for p in head_dims]  # head-major, like the original
    rows = None
    if channels is not None:
        dt_rows = [inner + inner + bc + h for h in heads]
        rows = channels + [inner + c for c in channels] + list(range(2 * inner, 2 * inner + bc)) + dt_rows
    mixer.in_proj = slice_linear(mixer.in_proj, rows, hidden)
    mixer.out_proj = slice_linear(mixer.out_proj, hidden, channels)
    if hidden is not None:
        mixer.hidden_size = len(hidden)
    norm = mixer.norm
    norm.variance_epsilon *= eps_scale
    if channels is None:
        return
    mixer.conv1d = slice_depthwise_conv1d(mixer.conv1d, channels + list(range(inner, inner + bc)))
    for name in ("A_log", "D", "dt_bias"):
        setattr(mixer, name, slice_parameter(getattr(mixer, name), heads))
    old_group = inner // groups
    norm.weight = slice_parameter(norm.weight, channels)
    norm.group_size = len(channels) // groups
    if rescale_norm:
        norm.weight.mul_((old_group / norm.group_size) ** 0.5)
    mixer.num_heads, mixer.head_dim = len(heads), len(head_dims)
    mixer.intermediate_size = len(channels)
    mixer.conv_dim = len(channels) + bc
