"""The pruning plan: target validation, GQA head choice, layer choice, plan.json round trip. No model needed."""

from __future__ import annotations

import pytest
import torch

from llmprune.config import ConfigError
from llmprune.plan import (
    PlanError,
    PruningPlan,
    choose_heads,
    choose_layers,
    depth_score_name,
    make_plan,
    resolve_targets,
)

DIMS = {"hidden_size": 48, "ffn_hidden_size": 80, "num_attention_heads": 6, "num_query_groups": 2, "num_layers": 4,
        "head_dim": 8, "vocab_size": 128}
PREFIX = "prune.export_config."


def error_of(targets: dict, dims: dict = DIMS) -> str:
    with pytest.raises(PlanError) as info:
        resolve_targets(dims, targets)
    assert isinstance(info.value, ConfigError)  # the CLI reports ConfigErrors without a traceback
    return str(info.value)


# -- resolve_targets -------------------------------------------------------------------------------------------


def test_resolve_fills_unset_targets_from_the_model():
    out = resolve_targets(DIMS, {"hidden_size": 32, "ffn_hidden_size": 40})
    assert out == {**DIMS, "hidden_size": 32, "ffn_hidden_size": 40}
    assert resolve_targets(DIMS, {}) == DIMS


def test_resolve_groups_alone_removes_their_heads():
    assert resolve_targets(DIMS, {"num_query_groups": 1})["num_attention_heads"] == 3
    out = resolve_targets(DIMS, {"num_query_groups": 1, "num_attention_heads": 2})
    assert (out["num_attention_heads"], out["num_query_groups"]) == (2, 1)


def test_resolve_rejects_bigger_than_model():
    msg = error_of({"hidden_size": 64})
    assert f"{PREFIX}hidden_size=64" in msg and "larger than the model's 48" in msg and "at most 48" in msg


@pytest.mark.parametrize("value", [40.5, "40", True, 0, -8, 8.0])
def test_resolve_rejects_non_positive_integers(value):
    msg = error_of({"ffn_hidden_size": value})
    assert f"{PREFIX}ffn_hidden_size=" in msg and "must be a positive integer" in msg


def test_resolve_rejects_heads_not_a_multiple_of_groups():
    msg = error_of({"num_attention_heads": 5})
    assert f"{PREFIX}num_attention_heads=5" in msg and "not a multiple of num_query_groups=2" in msg
    assert "every KV group keeps the same number of query heads" in msg


def test_resolve_rejects_more_heads_per_group_than_the_model_has():
    msg = error_of({"num_attention_heads": 6, "num_query_groups": 1})
    assert f"{PREFIX}num_attention_heads=6" in msg and "needs 6 heads per group" in msg and "has 3" in msg
    assert "raise num_query_groups or lower num_attention_heads" in msg


def test_resolve_rejects_unknown_keys_and_lists_the_known_ones():
    msg = error_of({"hiden_size": 32})
    assert f"{PREFIX}hiden_size" in msg
    assert "Known: hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, num_layers" in msg


def test_resolve_reports_every_problem_at_once():
    msg = error_of({"hiden_size": 32, "ffn_hidden_size": 100, "num_layers": 0, "num_attention_heads": 2.0})
    lines = [line for line in msg.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 4, msg
    for key in ("hiden_size", "ffn_hidden_size=100", "num_layers=0", "num_attention_heads=2.0"):
        assert f"{PREFIX}{key}" in msg


def test_resolve_uses_the_callers_prefix():
    with pytest.raises(PlanError, match=r"export_config\.hidden_size=64") as info:
        resolve_targets(DIMS, {"hidden_size": 64}, prefix="export_config.")
    assert PREFIX not in str(info.value)


# -- choose_heads -----------------------------------------------------------------------------------------------


def test_choose_heads_ranks_groups_then_heads_within_groups():
    # 6 heads, 2 groups: group 0 = heads 0-2, group 1 = heads 3-5
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.4])
    assert choose_heads(scores, 2, 2, 4) == ([0, 1], [0, 2, 4, 5])  # best 2 of each group
    assert choose_heads(scores, 2, 2, 2) == ([0, 1], [0, 5])
    assert choose_heads(scores, 2, 1, 3) == ([0], [0, 1, 2])  # |g0| = 1.04 > |g1| = 0.54
    assert choose_heads(scores, 2, 1, 1) == ([0], [0])


def test_choose_heads_group_score_is_l2_not_max():
    # group 0 has the single best head, group 1 the larger L2 norm: the group with the larger norm stays
    scores = torch.tensor([1.0, 0.0, 0.0, 0.7, 0.7, 0.7])
    assert choose_heads(scores, 2, 1, 3) == ([1], [3, 4, 5])


def test_choose_heads_keeps_heads_inside_their_groups():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(12, generator=gen)  # 4 groups of 3
    groups, heads = choose_heads(scores, 4, 2, 4)
    assert len(groups) == 2 and len(heads) == 4
    assert [h // 3 for h in heads] == [groups[0], groups[0], groups[1], groups[1]]
    by_group = scores.view(4, 3)
    assert set(groups) == set(torch.topk(by_group.norm(dim=1), 2).indices.tolist())
    for g in groups:
        worst = min(range(3), key=lambda j: by_group[g, j].item())
        assert g * 3 + worst not in heads


# -- choose_layers ----------------------------------------------------------------------------------------------


def test_choose_layers_block_importance_removes_the_most_similar():
    scores = {"block_importance": torch.tensor([0.5, 0.1, 0.3, 0.05])}
    out = choose_layers(scores, 4, 2, "block_importance", "lm_loss")
    assert out["kept"] == [0, 2] and out["removed"] == [1, 3]
    assert out["removed_scores"] == pytest.approx([0.1, 0.05])
    assert out["score_name"] == "block_importance"


@pytest.mark.parametrize("metric", ["lm_loss", "kl"])
def test_choose_layers_drop_one_removes_the_least_harmful(metric):
    scores = {f"depth.drop_one.{metric}": torch.tensor([2.0, 0.3, -0.01, 0.4, 5.0])}
    out = choose_layers(scores, 5, 3, "drop_one", metric)
    assert out["kept"] == [0, 3, 4] and out["removed"] == [1, 2]
    assert out["score_name"] == depth_score_name("drop_one", metric, 2) == f"depth.drop_one.{metric}"


def test_choose_layers_contiguous_removes_the_cheapest_block():
    name = depth_score_name("contiguous", "lm_loss", 2)
    assert name == "depth.contiguous.lm_loss.n2"
    scores = {name: torch.tensor([0.9, 0.7, 0.2, 0.8, 1.5])}  # 6 layers, blocks of 2 starting at 0..4
    out = choose_layers(scores, 6, 4, "contiguous", "lm_loss")
    assert out["removed"] == [2, 3] and out["kept"] == [0, 1, 4, 5]
    assert out["removed_scores"] == pytest.approx([0.2])


def test_choose_layers_keeps_all_without_scores_when_nothing_is_dropped():
    out = choose_layers({}, 4, 4, "drop_one", "lm_loss")
    assert out["kept"] == [0, 1, 2, 3] and out["removed"] == []


def test_choose_layers_names_the_missing_score():
    with pytest.raises(PlanError, match=r"depth\.contiguous\.kl\.n1") as info:
        choose_layers({"block_importance": torch.ones(4)}, 4, 3, "contiguous", "kl")
    assert "re-run calibration" in str(info.value)


# -- make_plan and plan.json ------------------------------------------------------------------------------------


def hand_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = {"hidden": torch.rand(48, generator=gen), "block_importance": torch.tensor([0.4, 0.01, 0.3, 0.2])}
    for i in range(4):
        scores[f"ffn.{i}"] = torch.rand(80, generator=gen)
        scores[f"heads.{i}"] = torch.rand(6, generator=gen)
    return scores


def full_plan() -> PruningPlan:
    return make_plan("llama", hand_scores(), DIMS, {"hidden_size": 40, "ffn_hidden_size": 64, "num_attention_heads": 2,
                                                    "num_query_groups": 1, "num_layers": 3},
                     depth_method="block_importance", rescale_norms=True)


def test_make_plan_keeps_the_top_units_of_kept_layers():
    scores = hand_scores()
    plan = full_plan()
    assert plan.kept_layers == [0, 2, 3] and plan.depth["removed"] == [1]
    assert plan.hidden == sorted(torch.topk(scores["hidden"], 40).indices.tolist())
    assert set(plan.ffn) == set(plan.heads) == set(plan.groups) == {0, 2, 3}
    for i in plan.kept_layers:
        assert plan.ffn[i] == sorted(torch.topk(scores[f"ffn.{i}"], 64).indices.tolist())
        assert (plan.groups[i], plan.heads[i]) == choose_heads(scores[f"heads.{i}"], 2, 1, 2)
    expected_mass = float(scores["hidden"][plan.hidden].sum() / scores["hidden"].sum())
    assert plan.summary["hidden_score_mass_kept"] == pytest.approx(expected_mass, abs=1e-4)
    assert 0 < plan.summary["ffn_score_mass_kept"] < 1 and 0 < plan.summary["heads_score_mass_kept"] < 1
    assert plan.target["num_layers"] == 3 and not plan.is_empty


def test_make_plan_only_touches_dimensions_that_shrink():
    plan = make_plan("llama", hand_scores(), DIMS, {"ffn_hidden_size": 64})
    assert plan.ffn is not None and plan.hidden is None and plan.heads is None and plan.groups is None
    assert plan.kept_layers == [0, 1, 2, 3] and plan.summary.keys() == {"ffn_score_mass_kept"}


def test_plan_json_round_trip():
    plan = full_plan()
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert all(isinstance(k, int) for k in again.ffn) and all(isinstance(k, int) for k in again.heads)
    assert f"\"hidden\": [{', '.join(map(str, plan.hidden))}]" in text  # index lists stay on one line


def test_empty_plan_json_round_trip():
    plan = make_plan("qwen3", {}, DIMS, {})
    assert plan.is_empty
    assert PruningPlan.from_json(plan.to_json()) == plan


def test_drop_layers_removes_exactly_the_named_layers_without_depth_scores():
    scores = {"hidden": torch.rand(48)}  # no depth score at all: none is needed
    plan = make_plan("llama", scores, DIMS, {}, drop_layers=[3, 1])
    assert plan.kept_layers == [0, 2] and plan.depth["removed"] == [1, 3] and plan.target["num_layers"] == 2
    assert plan.depth["method"] == "drop_layers"
    assert make_plan("llama", scores, DIMS, {"num_layers": 2}, drop_layers=[1, 3]).kept_layers == [0, 2]


@pytest.mark.parametrize("drop, targets, message", [
    ([1, 4], {}, r"must name distinct layers in 0 \.\. 3 and keep at least one \(\[4\] are out of range\)"),
    ([1, 1], {}, "must name distinct layers"),
    ([0, 1, 2, 3], {}, "keep at least one"),
    ([1], {"num_layers": 2}, r"export_config.num_layers=2 but prune.depth.drop_layers removes 1 of 4 layers"),
])
def test_drop_layers_errors_name_the_keys(drop, targets, message):
    with pytest.raises(PlanError, match=message):
        make_plan("llama", {"hidden": torch.rand(48)}, DIMS, targets, drop_layers=drop)
