"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from llmprune.plan import make_plan


def real_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def plan_for(adapter, scores: dict, targets: dict, **kwargs):
    """make_plan for this adapter's model (hybrids: with its layer types)."""
    return make_plan(adapter.family, scores, adapter.dims(), targets, layer_types=getattr(adapter, "layer_types", None),
                     **kwargs)


def random_unit_scores(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random unit scores for every dimension the adapter's family has (and random depth scores)."""
    d = adapter.dims()
    g = torch.Generator().manual_seed(seed)
    scores = {"hidden": torch.rand(d["hidden_size"], generator=g),
              "block_importance": torch.rand(d["num_layers"], generator=g)}
    types = getattr(adapter, "layer_types", None)
    for i in range(d["num_layers"]):
        kind = types[i] if types else None
        if "ffn_hidden_size" in d and kind in (None, "mlp"):
            scores[f"ffn.{i}"] = torch.rand(d["ffn_hidden_size"], generator=g)
        if "num_attention_heads" in d and kind in (None, "full_attention"):
            scores[f"heads.{i}"] = torch.rand(d["num_attention_heads"], generator=g)
        if "mamba_num_heads" in d and kind in (None, "linear_attention"):
            scores[f"mamba_heads.{i}"] = torch.rand(d["mamba_num_heads"], generator=g)
            scores[f"mamba_head_dim.{i}"] = torch.rand(d["mamba_head_dim"], generator=g)
    return scores


def plan_with_random_scores(adapter, targets: dict, seed: int = 0, **kwargs):
    """A plan for `targets` from random scores; layers removed by (random) Block Importance."""
    kwargs.setdefault("depth_method", "block_importance")
    return make_plan(adapter.family, random_unit_scores(adapter, seed), adapter.dims(), targets,
                     layer_types=getattr(adapter, "layer_types", None), **kwargs)
