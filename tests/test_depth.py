"""Depth removal scores: the batched wavefront (every candidate stacked through each layer) against the same candidates
run one at a time, and against really deleting the layers for the Mamba-2 and Nemotron-H families (the llama-like
families are checked against deletion in test_importance.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SSM_FAMILIES, tiny_batch, tiny_model, tiny_ssm_model
from torch import nn

from llmprune.adapters import get_adapter
from llmprune.data import Batch
from llmprune.importance import depth
from llmprune.importance.depth import removal_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", *SSM_FAMILIES]


def build(family: str, **overrides):
    return (tiny_ssm_model if family in SSM_FAMILIES else tiny_model)(family, **overrides)


def batches() -> list[Batch]:
    """Two batches of different sizes, one with right padding (padding must not enter any score)."""
    ids = tiny_batch(3, 16, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    return [Batch(tiny_batch(2, 16, seed=5)), Batch(torch.where(mask.bool(), ids, 1), mask)]


def assert_same_scores(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 2e-6) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert torch.allclose(a, e, rtol=rtol, atol=atol), f"{name}: max abs diff {(a - e).abs().max():.3g}\n{a}\n{e}"


@pytest.mark.parametrize("metric", ["lm_loss", "kl"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_candidates_give_the_one_at_a_time_scores(family, metric):
    """Stacking candidates changes only how many rows a layer call sees: every group size gives the scores of the
    one-at-a-time walk. Block size 1 duplicates the drop-one candidates (same (start, size) twice in one pass)."""
    model = build(family)
    adapter = get_adapter(model)
    n = adapter.dims()["num_layers"]
    kwargs = {"metric": metric, "drop_one": True, "block_sizes": (1, 2, n - 1)}
    one = removal_scores(model, adapter, batches(), candidates_per_pass=1, **kwargs)
    for per_pass in (2, 3, None):  # uneven groups, and everything in one pass (the default's budget holds it)
        assert_same_scores(removal_scores(model, adapter, batches(), candidates_per_pass=per_pass, **kwargs), one)
    assert torch.equal(one[f"depth.contiguous.{metric}.n1"], one[f"depth.drop_one.{metric}"])
    assert (one[f"depth.drop_one.{metric}"].abs() > 1e-6).all(), one  # every layer matters in a random model


def test_the_byte_budget_sets_the_group_size(monkeypatch):
    """CANDIDATE_BATCH_BYTES caps the stacked hidden states: a budget of 2.5 candidates' states runs 2 at a time."""
    model = tiny_model("llama", num_hidden_layers=5)
    adapter = get_adapter(model)
    data = batches()[:1]  # (2, 16) tokens, hidden 48, float32
    sizes = []
    walk = depth._walk

    def counted(layers, recorded, candidates, group, *args):
        sizes.append(len(group))
        return walk(layers, recorded, candidates, group, *args)

    monkeypatch.setattr(depth, "_walk", counted)
    monkeypatch.setattr(depth, "CANDIDATE_BATCH_BYTES", int(2.5 * 2 * 16 * 48 * 4))
    scores = removal_scores(model, adapter, data)
    assert sizes == [2, 2, 1], sizes
    sizes.clear()
    monkeypatch.setattr(depth, "CANDIDATE_BATCH_BYTES", 10**9)
    assert_same_scores(removal_scores(model, adapter, data), scores)
    assert sizes == [5], sizes


def without_layers(model, removed: list[int]):
    """A copy of the model whose layers are really gone (Mamba-2: backbone.layers; Nemotron-H: model.layers, each
    block picks its mask by its own block_type)."""
    copy_ = copy.deepcopy(model)
    body = get_adapter(copy_).backbone
    body.layers = nn.ModuleList(layer for i, layer in enumerate(body.layers) if i not in removed)
    return copy_


def mean_loss(model, data: list[Batch], metric: str, teacher=None) -> float:
    total = tokens = 0.0
    for batch in data:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            valid = batch.attention_mask[:, 1:].float() if batch.attention_mask is not None else None
            valid = torch.ones(logits.shape[:2]) if valid is None else valid
            if metric == "lm_loss":
                per_token = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
            else:
                ref = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
                per_token = F.kl_div(
                    F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none"
                ).sum(-1)
        total += float((per_token * valid).sum())
        tokens += float(valid.sum())
    return total / tokens


@pytest.mark.parametrize("metric", ["lm_loss", "kl"])
@pytest.mark.parametrize("family", list(SSM_FAMILIES))
def test_ssm_removal_scores_equal_deleting_the_layers(family, metric):
    model = build(family)
    adapter = get_adapter(model)
    n = adapter.dims()["num_layers"]
    data = batches()
    scores = removal_scores(model, adapter, data, metric=metric, drop_one=True, block_sizes=(2,))
    base = mean_loss(model, data, metric, teacher=model)

    def reference(removed):
        return mean_loss(without_layers(model, removed), data, metric, teacher=model) - base

    expected = {
        f"depth.drop_one.{metric}": torch.tensor([reference([i]) for i in range(n)]),
        f"depth.contiguous.{metric}.n2": torch.tensor([reference([s, s + 1]) for s in range(n - 1)]),
    }
    assert_same_scores(scores, expected, rtol=1e-4, atol=2e-5)
