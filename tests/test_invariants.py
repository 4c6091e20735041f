"""Invariants of pruning on tiny random models of every llama-like family.

Pruning nothing changes nothing; removing units that were zeroed first changes nothing; the analytic parameter
count is the real one; GQA heads stay with their KV group. Scores are hand-made here (the plan only reads names),
except where a test checks that real calibration ranks zeroed units lowest.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model
from helpers import assert_close, logits_of, plan_for, real_param_count

from llmprune.adapters import get_adapter
from llmprune.data import Batch
from llmprune.importance.activation import activation_scores

HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_scores(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    """Strictly positive hand-made scores for every dimension (1 .. 2), so a zeroed unit is the unique minimum."""
    gen = torch.Generator().manual_seed(seed)
    d = adapter.dims()
    scores = {"hidden": 1 + torch.rand(d["hidden_size"], generator=gen)}
    for i in range(d["num_layers"]):
        scores[f"ffn.{i}"] = 1 + torch.rand(d["ffn_hidden_size"], generator=gen)
        scores[f"heads.{i}"] = 1 + torch.rand(d["num_attention_heads"], generator=gen)
    scores["depth.drop_one.lm_loss"] = 1 + torch.rand(d["num_layers"], generator=gen)
    return scores


# -- pruning nothing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["no_targets", "targets_equal_sizes"])
def test_empty_plan_keeps_logits_and_weights(family, how):
    model = tiny_model(family)
    ids = tiny_batch()
    before = logits_of(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    dims = adapter.dims()
    targets = {} if how == "no_targets" else {k: dims[k] for k in ("hidden_size", "ffn_hidden_size",
                                                                    "num_attention_heads", "num_query_groups",
                                                                    "num_layers")}
    plan = plan_for(adapter, random_scores(adapter), targets, rescale_norms=True)
    assert plan.is_empty and plan.hidden is None and plan.ffn is None and plan.heads is None
    model = adapter.apply(plan)
    assert torch.equal(logits_of(model, ids), before)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert adapter.dims() == dims


# -- zeroed units pruned ----------------------------------------------------------------------------------------


def zero_ffn_neurons(model, per_layer: dict[int, list[int]]) -> None:
    with torch.no_grad():
        for i, neurons in per_layer.items():
            mlp = model.model.layers[i].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[neurons] = 0
                if proj.bias is not None:
                    proj.bias[neurons] = 0
            mlp.down_proj.weight[:, neurons] = 0


@pytest.mark.parametrize("scores_from", ["hand_made", "calibration"])
def test_zeroed_ffn_neurons_pruned_keep_logits(family, scores_from):
    model = tiny_model(family)
    ffn, keep = model.config.intermediate_size, 64
    gen = torch.Generator().manual_seed(3)
    zeroed = {i: sorted(torch.randperm(ffn, generator=gen)[: ffn - keep].tolist()) for i in range(4)}
    zero_ffn_neurons(model, zeroed)
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    if scores_from == "hand_made":
        scores = random_scores(adapter)
        for i, neurons in zeroed.items():
            scores[f"ffn.{i}"][neurons] = 0
    else:  # a zeroed neuron's down_proj input is exactly 0, so Minitron ranks it last
        scores = activation_scores(model, adapter, [Batch(tiny_batch(4, 16, seed=5))])
    plan = plan_for(adapter, scores, {"ffn_hidden_size": keep})
    for i in range(4):
        assert plan.ffn[i] == [n for n in range(ffn) if n not in zeroed[i]]
    model = adapter.apply(plan)
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (keep, 48) and layer.mlp.down_proj.weight.shape == (48, keep)
    assert model.config.intermediate_size == keep
    assert_close(logits_of(model, ids), before)


def zero_query_heads(model, per_layer: dict[int, list[int]], head_dim: int = 8) -> None:
    with torch.no_grad():
        for i, heads in per_layer.items():
            o_proj = model.model.layers[i].self_attn.o_proj
            for h in heads:
                o_proj.weight[:, h * head_dim: (h + 1) * head_dim] = 0


def test_zeroed_query_heads_pruned_keep_logits(family):
    model = tiny_model(family)  # 6 query heads in 2 KV groups: heads 0-2 read KV head 0, heads 3-5 KV head 1
    zeroed = {0: [0, 3], 1: [1, 5], 2: [2, 4], 3: [0, 5]}  # one per group and layer, so both groups keep 2
    zero_query_heads(model, zeroed)
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    scores = random_scores(adapter)
    for i, heads in zeroed.items():
        scores[f"heads.{i}"][heads] = 0
    plan = plan_for(adapter, scores, {"num_attention_heads": 4})
    assert plan.target["num_query_groups"] == 2
    for i, heads in zeroed.items():
        assert plan.heads[i] == [h for h in range(6) if h not in heads] and plan.groups[i] == [0, 1]
    model = adapter.apply(plan)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 48) and attn.k_proj.weight.shape == (16, 48)
    assert attn.o_proj.weight.shape == (48, 32)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert_close(logits_of(model, ids), before)


def zero_groups_output(model, per_layer: dict[int, int]) -> None:
    """Zero the o_proj input columns of every query head of one KV group per layer (3 heads of 8 channels)."""
    zero_query_heads(model, {i: [3 * g, 3 * g + 1, 3 * g + 2] for i, g in per_layer.items()})


def zero_groups_values(model, per_layer: dict[int, int]) -> None:
    """Zero a KV group's value rows: its query heads then output exactly 0 at the o_proj input."""
    with torch.no_grad():
        for i, g in per_layer.items():
            v_proj = model.model.layers[i].self_attn.v_proj
            v_proj.weight[8 * g: 8 * g + 8] = 0
            if v_proj.bias is not None:
                v_proj.bias[8 * g: 8 * g + 8] = 0


@pytest.mark.parametrize("how", ["o_proj_hand_made", "v_proj_calibration"])
def test_zeroed_query_groups_pruned_keep_logits(family, how):
    model = tiny_model(family)
    zeroed = {0: 0, 1: 1, 2: 1, 3: 0}
    (zero_groups_output if how.startswith("o_proj") else zero_groups_values)(model, zeroed)
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    if how == "o_proj_hand_made":
        scores = random_scores(adapter)
        for i, g in zeroed.items():
            scores[f"heads.{i}"][3 * g: 3 * g + 3] = 0
    else:
        scores = activation_scores(model, adapter, [Batch(tiny_batch(4, 16, seed=5))])
    plan = plan_for(adapter, scores, {"num_query_groups": 1})
    assert plan.target["num_attention_heads"] == 3  # removing a group removes its query heads
    for i, g in zeroed.items():
        assert plan.groups[i] == [1 - g] and plan.heads[i] == [3 * (1 - g) + j for j in range(3)]
    model = adapter.apply(plan)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.weight.shape == (8, 48) and attn.v_proj.weight.shape == (8, 48)
        assert attn.q_proj.weight.shape == (24, 48) and attn.num_key_value_groups == 3
    assert model.config.num_key_value_heads == 1
    assert_close(logits_of(model, ids), before)


def zero_hidden_channels(model, channels: list[int]) -> None:
    """Zero the residual stream at `channels`: the embedding and every writer into it (o_proj, down_proj rows)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight[channels] = 0
                if proj.bias is not None:
                    proj.bias[channels] = 0


def hidden_norms(model) -> list:
    """The RMSNorms over the hidden width (not qwen3's per-head q_norm / k_norm)."""
    return [getattr(layer, name) for layer in model.model.layers for name in HIDDEN_NORMS] + [model.model.norm]


def per_head_norm_outputs(model, ids) -> list[torch.Tensor]:
    """The outputs of every q_norm / k_norm (qwen3; [] elsewhere) on `ids`."""
    outputs, handles = [], []
    for layer in model.model.layers:
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                handles.append(getattr(layer.self_attn, name).register_forward_hook(
                    lambda _m, _i, out: outputs.append(out.detach())))
    logits_of(model, ids)
    for handle in handles:
        handle.remove()
    return outputs


EPS = 1e-3  # of the order of the tiny models' mean squares: any slip of an epsilon shows in the logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zeroed_hidden_channels_pruned(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied, rms_norm_eps=EPS)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    d, keep = 48, 36
    channels = sorted(torch.randperm(d, generator=torch.Generator().manual_seed(7))[: d - keep].tolist())
    zero_hidden_channels(model, channels)
    ids = tiny_batch()
    zeroed_logits = logits_of(model, ids)
    zeroed_head_norms = per_head_norm_outputs(model, ids)
    assert len(zeroed_head_norms) == (8 if family == "qwen3" else 0)
    adapter = get_adapter(model)
    scores = random_scores(adapter)
    scores["hidden"][channels] = 0
    kept = [c for c in range(d) if c not in channels]

    # With rescaled norms the width change is compensated exactly: the same function. The config's epsilon (shared
    # by qwen3's per-head q_norm / k_norm, whose width does not change) stays; the residual stream is scaled instead.
    rescaled = copy.deepcopy(model)
    adapter_r = get_adapter(rescaled)
    plan = plan_for(adapter_r, scores, {"hidden_size": keep}, rescale_norms=True)
    assert plan.hidden == kept
    rescaled = adapter_r.apply(plan)
    assert rescaled.model.embed_tokens.weight.shape == (128, keep)
    assert rescaled.lm_head.weight.shape == (128, keep)
    assert (rescaled.lm_head.weight is rescaled.model.embed_tokens.weight) == tied
    assert rescaled.model.layers[0].self_attn.o_proj.weight.shape == (keep, 48)  # (hidden, heads * hd)
    assert rescaled.config.hidden_size == keep
    assert rescaled.config.rms_norm_eps == EPS
    for norm in hidden_norms(rescaled):
        assert norm.weight.shape == (keep,) and norm.variance_epsilon == EPS
    assert_close(logits_of(rescaled, ids), zeroed_logits)
    # qwen3's q_norm / k_norm (over head_dim, unchanged): the same weights, epsilon and outputs
    for before, after in zip(model.model.layers, rescaled.model.layers):
        for name in ("q_norm", "k_norm"):
            if hasattr(before.self_attn, name):
                old, new = getattr(before.self_attn, name), getattr(after.self_attn, name)
                assert torch.equal(old.weight, new.weight) and old.variance_epsilon == new.variance_epsilon == EPS
    rescaled_head_norms = per_head_norm_outputs(rescaled, ids)
    assert len(rescaled_head_norms) == len(zeroed_head_norms)
    for before, after in zip(zeroed_head_norms, rescaled_head_norms):
        assert_close(after, before, atol=1e-5)

    # Without rescaling, mean(x^2) now divides by d' instead of d: the pruned model is the zeroed model whose
    # hidden norms have weight * sqrt(d'/d) and eps * d'/d, since
    # w x / sqrt(sum/d' + eps) == w sqrt(d'/d) x / sqrt(sum/d + eps d'/d).
    plain = copy.deepcopy(model)
    adapter_p = get_adapter(plain)
    plain = adapter_p.apply(plan_for(adapter_p, scores, {"hidden_size": keep}, rescale_norms=False))
    assert plain.config.rms_norm_eps == EPS
    pruned_logits = logits_of(plain, ids)
    assert (pruned_logits - zeroed_logits).abs().max() > 1e-3, "the norm width change should matter here"
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        for norm in hidden_norms(expected_model):
            norm.weight.mul_((keep / d) ** 0.5)
            norm.variance_epsilon *= keep / d
    assert_close(pruned_logits, logits_of(expected_model, ids))


def test_rescaled_norms_keep_tensors_plain_slices_times_one_factor_each():
    """What rescale_norms does to the tensors, by kind (llmprune/pruning/map.py, norm_factor): with r = d / d', the
    residual writers and the head are slices times sqrt(1 / r), hidden norms times sqrt(r), the final norm times r,
    and everything else (q/k/v, gate/up, qwen3's q_norm / k_norm) a plain slice."""
    model = tiny_model("qwen3")
    adapter = get_adapter(copy.deepcopy(model))
    plan = plan_for(adapter, random_scores(adapter), {"hidden_size": 32}, rescale_norms=True)
    pruned = adapter.apply(plan).state_dict()
    h, r = torch.tensor(plan.hidden), 48 / 32
    factors = {"embed_tokens.weight": r**-0.5, "lm_head.weight": r**-0.5, "o_proj.weight": r**-0.5,
               "down_proj.weight": r**-0.5, "layernorm.weight": r**0.5, "model.norm.weight": r}
    for name, tensor in model.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                          "gate_proj.weight", "up_proj.weight")):
            expected = tensor[:, h]
        elif name.endswith(("o_proj.weight", "down_proj.weight", "layernorm.weight", "model.norm.weight")):
            expected = tensor[h]
        else:
            expected = tensor
        factor = next((f for suffix, f in factors.items() if name.endswith(suffix)), 1.0)
        torch.testing.assert_close(pruned[name], expected * factor, rtol=1e-6, atol=0, msg=name)


def test_everything_zeroed_at_once_pruned_keeps_logits(family):
    """Hidden, FFN, heads and groups together (the slicing of one dimension must not disturb another)."""
    model = tiny_model(family)
    channels = [1, 5, 8, 13, 21, 34, 40, 47]
    zero_hidden_channels(model, channels)
    zero_ffn_neurons(model, {i: list(range(i, 80, 5)) for i in range(4)})  # 16 per layer
    zero_groups_output(model, {0: 1, 1: 0, 2: 0, 3: 1})  # then one more head per remaining group
    kept_group = {0: 0, 1: 1, 2: 1, 3: 0}
    zero_query_heads(model, {i: [3 * g + (i % 3)] for i, g in kept_group.items()})
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    scores = random_scores(adapter)
    scores["hidden"][channels] = 0
    for i, g in kept_group.items():
        scores[f"ffn.{i}"][list(range(i, 80, 5))] = 0
        scores[f"heads.{i}"][3 * (1 - g): 3 * (1 - g) + 3] = 0.01  # the group's norm is the lowest
        scores[f"heads.{i}"][3 * g + (i % 3)] = 0
    plan = plan_for(adapter, scores, {"hidden_size": 40, "ffn_hidden_size": 64, "num_attention_heads": 2,
                                      "num_query_groups": 1}, rescale_norms=True)
    model = adapter.apply(plan)
    assert_close(logits_of(model, ids), before)
    assert real_param_count(model) == adapter.count_params()


# -- the pruned model is the model its config describes ----------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
def test_rebuilt_from_config_matches_pruned(family, rescale):
    """A fresh model built from the rewritten config loads the pruned weights strictly and computes the same logits
    (what a stock reload of the exported checkpoint will do)."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = plan_for(adapter, random_scores(adapter), {"hidden_size": 32, "ffn_hidden_size": 40,
                                                       "num_attention_heads": 2, "num_query_groups": 1,
                                                       "num_layers": 3}, rescale_norms=rescale)
    model = adapter.apply(plan)
    assert len(model.model.layers) == model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    fresh = type(model)(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = tiny_batch()
    pruned = logits_of(model, ids)
    assert torch.isfinite(pruned).all()
    assert_close(logits_of(fresh, ids), pruned, atol=1e-5)


# -- analytic parameter counts ----------------------------------------------------------------------------------

COUNT_TARGETS = [
    {},
    {"hidden_size": 40},
    {"ffn_hidden_size": 24},
    {"num_attention_heads": 4},
    {"num_query_groups": 1},
    {"num_attention_heads": 2, "num_query_groups": 1},
    {"num_layers": 2},
    {"hidden_size": 32, "ffn_hidden_size": 56, "num_attention_heads": 4, "num_layers": 3},
]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("targets", COUNT_TARGETS, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()) or "none")
def test_count_params_is_exact(family, tied, targets):
    model = tiny_model(family, tie_word_embeddings=tied)
    adapter = get_adapter(model)
    before = adapter.count_params()
    assert before == real_param_count(model)
    plan = plan_for(adapter, random_scores(adapter), targets)
    predicted = adapter.count_params(plan.target)  # before pruning: a hypothetical shape
    model = adapter.apply(plan)
    actual = real_param_count(model)
    assert predicted == actual == adapter.count_params(), (predicted, actual, adapter.count_params())
    if targets:
        assert actual < before or plan.is_empty


@pytest.mark.parametrize("extra", [
    {"attention_bias": True, "mlp_bias": True},
    {"attention_bias": True, "mlp_bias": False},
    {"attention_bias": False, "mlp_bias": True},
], ids=["both", "attention", "mlp"])
def test_count_params_with_llama_biases(extra):
    model = tiny_model("llama", **extra)
    adapter = get_adapter(model)
    assert adapter.count_params() == real_param_count(model)
    plan = plan_for(adapter, random_scores(adapter), {"hidden_size": 40, "ffn_hidden_size": 32,
                                                       "num_attention_heads": 2, "num_query_groups": 1})
    predicted = adapter.count_params(plan.target)
    model = adapter.apply(plan)
    assert predicted == real_param_count(model) == adapter.count_params()


def test_count_params_knows_family_extras():
    """qwen2's q/k/v biases and qwen3's q_norm / k_norm are counted: the counts differ from llama's by exactly them."""
    counts = {f: get_adapter(tiny_model(f)).count_params() for f in ("llama", "qwen2", "qwen3")}
    layers, heads, groups, hd = 4, 6, 2, 8
    assert counts["qwen2"] - counts["llama"] == layers * (heads + 2 * groups) * hd
    assert counts["qwen3"] - counts["llama"] == layers * 2 * hd


# -- GQA layout ---------------------------------------------------------------------------------------------------


def test_gqa_kept_heads_stay_with_their_group(family):
    # 12 query heads in 4 KV groups (3 per group) -> 3 groups of 2
    model = tiny_model(family, num_attention_heads=12, num_key_value_heads=4)
    original = copy.deepcopy(model)
    adapter = get_adapter(model)
    hd, per_group = 8, 3
    scores = random_scores(adapter, seed=11)
    plan = plan_for(adapter, scores, {"num_attention_heads": 6, "num_query_groups": 3})
    model = adapter.apply(plan)
    new_per_group = 2
    for i, (old, new) in enumerate(zip(original.model.layers, model.model.layers)):
        heads, groups = plan.heads[i], plan.groups[i]
        assert len(heads) == 6 and len(groups) == 3 and heads == sorted(heads) and groups == sorted(groups)
        for j, h in enumerate(heads):
            assert groups[j // new_per_group] == h // per_group, (i, j, h, groups)
        q_rows = [h * hd + c for h in heads for c in range(hd)]
        kv_rows = [g * hd + c for g in groups for c in range(hd)]
        o, n = old.self_attn, new.self_attn
        assert torch.equal(n.q_proj.weight, o.q_proj.weight[q_rows])
        assert torch.equal(n.k_proj.weight, o.k_proj.weight[kv_rows])
        assert torch.equal(n.v_proj.weight, o.v_proj.weight[kv_rows])
        assert torch.equal(n.o_proj.weight, o.o_proj.weight[:, q_rows])
        if o.q_proj.bias is not None:
            assert torch.equal(n.q_proj.bias, o.q_proj.bias[q_rows])
            assert torch.equal(n.k_proj.bias, o.k_proj.bias[kv_rows])
            assert torch.equal(n.v_proj.bias, o.v_proj.bias[kv_rows])
        if hasattr(o, "q_norm"):  # per-head norms are shared by all heads: untouched
            assert torch.equal(n.q_norm.weight, o.q_norm.weight) and torch.equal(n.k_norm.weight, o.k_norm.weight)


def test_gqa_pruning_equals_masking_the_removed_heads(family):
    """Functional form of the layout check: pruning heads and groups computes exactly what the original model
    computes with the removed heads' o_proj columns zeroed. A head wired to the wrong KV group would break this."""
    model = tiny_model(family, num_attention_heads=12, num_key_value_heads=4)
    adapter = get_adapter(model)
    plan = plan_for(adapter, random_scores(adapter, seed=4), {"num_attention_heads": 6, "num_query_groups": 3})
    masked = copy.deepcopy(model)
    zero_query_heads(masked, {i: [h for h in range(12) if h not in plan.heads[i]] for i in range(4)})
    ids = tiny_batch()
    model = adapter.apply(plan)
    assert_close(logits_of(model, ids), logits_of(masked, ids))
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 3
