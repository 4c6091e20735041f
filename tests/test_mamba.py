"""Invariants of Mamba pruning on tiny random Mamba2 and Nemotron-H models (heads, head dim, hidden, depth).

Each mixer's gated RMSNorm normalizes y * silu(z) over G groups of n = heads * head_dim / G channels, so removing
Mamba heads or head-dim channels makes every group n' wide and "removing units that were zeroed changes nothing"
holds only with that norm adjusted. Exactly, when the removed channels of y * silu(z) are zero:
  rescale_norms=False: pruned == original with each gated norm's weight * sqrt(n'/n) and epsilon * n'/n;
  rescale_norms=True:  pruned == original, for any hidden and Mamba widths together (the config's one
                       layer_norm_epsilon becomes epsilon * n/n', which the gated norms need, and the hidden norms'
                       width change is carried by scaling the residual stream: llmprune/pruning/map.py, norm_factor).

Mamba2Config also needs hidden_size * expand == heads * head_dim with a whole expand, so the targets below keep
heads * head_dim a multiple of hidden_size (Nemotron-H has no such tie and runs the same shapes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model, tiny_ssm_model
from helpers import assert_close, logits_of, plan_for, real_param_count
from transformers import AutoModelForCausalLM

from llmprune.adapters import get_adapter
from llmprune.config import ConfigError
from llmprune.data import Batch
from llmprune.export.hf import check_exportable, exportable_model, save_hf, verify_export
from llmprune.importance.activation import activation_scores
from llmprune.importance.baselines import baseline_scores
from llmprune.plan import TARGET_KEYS, PlanError, resolve_targets

HEADS, HEAD_DIM, GROUPS, STATE, INNER = 12, 8, 2, 8, 96  # tiny_ssm_config: 6 heads per group


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["mamba2", "nemotron_h"])
def ssm_family(request) -> str:
    return request.param


# -- helpers ------------------------------------------------------------------------------------------------------


def blocks(model):
    return model.backbone.layers if hasattr(model, "backbone") else model.model.layers


def mixers(model) -> dict[int, torch.nn.Module]:
    """Mamba mixers by layer index (Nemotron-H: its Mamba layers only)."""
    return {i: layer.mixer for i, layer in enumerate(blocks(model)) if hasattr(layer.mixer, "A_log")}


def hand_scores(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores in 1 .. 2 for every unit the model has (so a zeroed unit is the unique minimum)."""
    gen = torch.Generator().manual_seed(seed)
    d = adapter.dims()
    scores = {"hidden": 1 + torch.rand(d["hidden_size"], generator=gen),
              "depth.drop_one.lm_loss": 1 + torch.rand(d["num_layers"], generator=gen)}
    for i in mixers(adapter.model):
        scores[f"mamba_heads.{i}"] = 1 + torch.rand(d["mamba_num_heads"], generator=gen)
        scores[f"mamba_head_dim.{i}"] = 1 + torch.rand(d["mamba_head_dim"], generator=gen)
    for i, kind in enumerate(getattr(adapter, "layer_types", [])):
        if kind == "mlp":
            scores[f"ffn.{i}"] = 1 + torch.rand(d["ffn_hidden_size"], generator=gen)
        elif kind == "full_attention":
            scores[f"heads.{i}"] = 1 + torch.rand(d["num_attention_heads"], generator=gen)
    return scores


def channels_of(heads, head_dims) -> list[int]:
    return [h * HEAD_DIM + p for h in heads for p in head_dims]


def zero_gate(model, per_layer: dict[int, list[int]]) -> None:
    """Zero the z rows of in_proj for these channels: silu(0) = 0, so the gated norm sees exact zeros there."""
    with torch.no_grad():
        for i, channels in per_layer.items():
            mixers(model)[i].in_proj.weight[channels] = 0


def zero_x(model, per_layer: dict[int, list[int]]) -> None:
    """Zero the x rows of in_proj and the conv filters of these channels: their x (what Minitron scores) and
    their SSM output are then exactly zero."""
    with torch.no_grad():
        for i, channels in per_layer.items():
            m = mixers(model)[i]
            m.in_proj.weight[[INNER + c for c in channels]] = 0
            m.conv1d.weight[channels] = 0
            m.conv1d.bias[channels] = 0


def adjust_gated_norms(model, width_ratio: float, rescaled: bool) -> None:
    """Turn the original (zeroed) model into the function the pruned one computes (module docstring)."""
    if rescaled:  # the same function
        return
    with torch.no_grad():
        for m in mixers(model).values():
            m.norm.weight.mul_(width_ratio**0.5)
            m.norm.variance_epsilon *= width_ratio


def per_group_choice(seed: int, per_group: int) -> list[int]:
    """`per_group` random heads of each of the 2 groups (heads 0-5 and 6-11), ascending."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(g * 6 + j for g in range(GROUPS) for j in torch.randperm(6, generator=gen)[:per_group].tolist())


# -- pruning nothing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["no_targets", "targets_equal_sizes"])
def test_empty_plan_keeps_logits_and_weights(ssm_family, how):
    model = tiny_ssm_model(ssm_family)
    ids = tiny_batch()
    before = logits_of(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    dims, eps = adapter.dims(), model.config.layer_norm_epsilon
    targets = {} if how == "no_targets" else {k: dims[k] for k in TARGET_KEYS if k in dims}
    plan = plan_for(adapter, hand_scores(adapter), targets, rescale_norms=True)
    assert plan.is_empty and plan.hidden is None and plan.mamba_heads is None and plan.mamba_head_dim is None
    assert plan.ffn is None and plan.heads is None and plan.depth["removed"] == []
    model = adapter.apply(plan)
    assert torch.equal(logits_of(model, ids), before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert adapter.dims() == dims and model.config.layer_norm_epsilon == eps


# -- zeroed Mamba units pruned: the gated norm's width effect, exactly ---------------------------------------------


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
def test_zeroed_mamba_heads_pruned(ssm_family, rescale):
    model = tiny_ssm_model(ssm_family)
    layers = list(mixers(model))
    kept = {i: per_group_choice(seed=i, per_group=3) for i in layers}  # 6 of 12 heads, 3 in each group
    zero_gate(model, {i: channels_of([h for h in range(HEADS) if h not in kept[i]], range(HEAD_DIM)) for i in layers})
    ids = tiny_batch()
    zeroed = logits_of(model, ids)
    expected = copy.deepcopy(model)
    adjust_gated_norms(expected, 3 / 6, rescale)
    adapter = get_adapter(model)
    scores = hand_scores(adapter)
    for i in layers:
        scores[f"mamba_heads.{i}"][[h for h in range(HEADS) if h not in kept[i]]] = 0
    plan = plan_for(adapter, scores, {"mamba_num_heads": 6}, rescale_norms=rescale)
    assert plan.mamba_heads == kept and plan.mamba_head_dim is None and plan.hidden is None
    model = adapter.apply(plan)
    for m in mixers(model).values():  # in_proj rows: z 48, x 48, B 16, C 16, dt 6
        assert m.in_proj.weight.shape == (48 + 48 + 2 * GROUPS * STATE + 6, 48)
        assert m.conv1d.weight.shape == (48 + 2 * GROUPS * STATE, 1, 4) and m.conv1d.groups == 80
        assert m.A_log.shape == m.D.shape == m.dt_bias.shape == (6,)
        assert m.norm.weight.shape == (48,) and m.norm.group_size == 24 and m.out_proj.weight.shape == (48, 48)
    assert adapter.dims()["mamba_num_heads"] == 6
    assert_close(logits_of(model, ids), logits_of(expected, ids))
    if not rescale:  # the width effect is real: unadjusted, the plain slices differ
        assert (logits_of(model, ids) - zeroed).abs().max() > 1e-3
    else:
        assert model.config.layer_norm_epsilon == pytest.approx(1e-3 * 12 / 6)  # n / n'


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
def test_zeroed_mamba_head_dim_pruned(ssm_family, rescale):
    model = tiny_ssm_model(ssm_family)
    layers = list(mixers(model))
    gen = torch.Generator().manual_seed(5)
    kept = {i: sorted(torch.randperm(HEAD_DIM, generator=gen)[:4].tolist()) for i in layers}
    zero_gate(model, {i: channels_of(range(HEADS), [p for p in range(HEAD_DIM) if p not in kept[i]]) for i in layers})
    ids = tiny_batch()
    expected = copy.deepcopy(model)
    adjust_gated_norms(expected, 4 / 8, rescale)
    adapter = get_adapter(model)
    scores = hand_scores(adapter)
    for i in layers:
        scores[f"mamba_head_dim.{i}"][[p for p in range(HEAD_DIM) if p not in kept[i]]] = 0
    plan = plan_for(adapter, scores, {"mamba_head_dim": 4}, rescale_norms=rescale)
    assert plan.mamba_head_dim == kept and plan.mamba_heads is None
    model = adapter.apply(plan)
    for m in mixers(model).values():
        assert m.in_proj.weight.shape == (48 + 48 + 32 + 12, 48) and m.A_log.shape == (12,)
        assert m.norm.weight.shape == (48,) and m.norm.group_size == 24 and m.head_dim == 4
    assert adapter.dims()["mamba_head_dim"] == 4
    assert_close(logits_of(model, ids), logits_of(expected, ids))


def test_calibration_ranks_zeroed_heads_and_head_dims_last(ssm_family):
    """Zeroed x rows and conv filters make a head's (or head-dim channel's) x exactly 0: Minitron scores it 0,
    the plan drops it, and the pruned model is the adjusted original (n'/n = (4 * 6) / (6 * 8))."""
    model = tiny_ssm_model(ssm_family)
    layers = list(mixers(model))
    heads = {i: per_group_choice(seed=10 + i, per_group=4) for i in layers}
    dims = {i: sorted(torch.randperm(HEAD_DIM, generator=torch.Generator().manual_seed(i))[:6].tolist())
            for i in layers}
    dead = {i: sorted(set(range(INNER)) - set(channels_of(heads[i], dims[i]))) for i in layers}
    zero_x(model, dead)
    ids = tiny_batch()
    expected = copy.deepcopy(model)
    adjust_gated_norms(expected, 0.5, rescaled=False)
    adapter = get_adapter(model)
    scores = activation_scores(model, adapter, [Batch(tiny_batch(4, 16, seed=5))])
    plan = plan_for(adapter, scores, {"mamba_num_heads": 8, "mamba_head_dim": 6})
    assert plan.mamba_heads == heads and plan.mamba_head_dim == dims
    model = adapter.apply(plan)
    assert_close(logits_of(model, ids), logits_of(expected, ids))


def zero_hidden_channels(model, channels: list[int]) -> None:
    """Zero the residual stream at `channels`: the embedding and every writer into it."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channels] = 0
        for layer in blocks(model):
            m = layer.mixer
            writer = m.out_proj if hasattr(m, "out_proj") else m.o_proj if hasattr(m, "o_proj") else m.down_proj
            writer.weight[channels] = 0


@pytest.mark.parametrize("ssm_family, tied", [("mamba2", False), ("mamba2", True), ("nemotron_h", False)],
                         ids=["mamba2-untied", "mamba2-tied", "nemotron_h"])  # NemotronHForCausalLM never ties
def test_zeroed_hidden_channels_pruned_with_rescaled_norms(ssm_family, tied):
    """Hidden norms are exact with rescaling (as for decoders), and the gated norms, whose width does not change,
    keep the config's epsilon: the same function."""
    model = tiny_ssm_model(ssm_family, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    channels = sorted(torch.randperm(48, generator=torch.Generator().manual_seed(7))[:16].tolist())
    zero_hidden_channels(model, channels)
    ids = tiny_batch()
    expected = copy.deepcopy(model)
    adapter = get_adapter(model)
    scores = hand_scores(adapter)
    scores["hidden"][channels] = 0
    plan = plan_for(adapter, scores, {"hidden_size": 32}, rescale_norms=True)
    assert plan.hidden == [c for c in range(48) if c not in channels]
    model = adapter.apply(plan)
    assert model.get_input_embeddings().weight.shape == (128, 32) and model.lm_head.weight.shape == (128, 32)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    for m in mixers(model).values():
        assert m.in_proj.weight.shape[1] == 32 and m.out_proj.weight.shape == (32, INNER)
    assert model.config.layer_norm_epsilon == 1e-3
    if ssm_family == "mamba2":
        assert model.config.expand == 3  # 32 * 3 == 12 * 8
    assert_close(logits_of(model, ids), logits_of(expected, ids))


@pytest.mark.parametrize("per_group", [4, 2], ids=["ratios_equal", "ratios_differ"])
def test_rescaled_norms_are_exact_for_hidden_and_mamba_widths_together(ssm_family, per_group):
    """hidden 48 -> 32 (d/d' = 1.5) with heads 6 -> 4 per group (n/n' = 1.5) or 6 -> 2 (n/n' = 3): the pruned model
    is the same function either way (the config's epsilon follows n/n', the residual stream the hidden width)."""
    model = tiny_ssm_model(ssm_family)
    layers = list(mixers(model))
    hidden = sorted(torch.randperm(48, generator=torch.Generator().manual_seed(3))[:16].tolist())
    kept = {i: per_group_choice(seed=20 + i, per_group=per_group) for i in layers}
    zero_hidden_channels(model, hidden)
    zero_gate(model, {i: channels_of([h for h in range(HEADS) if h not in kept[i]], range(HEAD_DIM)) for i in layers})
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    scores = hand_scores(adapter)
    scores["hidden"][hidden] = 0
    for i in layers:
        scores[f"mamba_heads.{i}"][[h for h in range(HEADS) if h not in kept[i]]] = 0
    plain = copy.deepcopy(model)
    targets = {"hidden_size": 32, "mamba_num_heads": 2 * per_group}
    model = adapter.apply(plan_for(adapter, scores, targets, rescale_norms=True))
    assert model.config.layer_norm_epsilon == pytest.approx(1e-3 * 6 / per_group)
    assert_close(logits_of(model, ids), before)
    plain_adapter = get_adapter(plain)
    plain = plain_adapter.apply(plan_for(plain_adapter, scores, targets))
    assert (logits_of(plain, ids) - before).abs().max() > 1e-3  # without rescaling both widths show


# -- layout, scores, plan -----------------------------------------------------------------------------------------


def test_kept_heads_and_head_dims_slice_every_mixer_weight_consistently(ssm_family):
    model = tiny_ssm_model(ssm_family, use_bias=True)
    original = copy.deepcopy(model)
    adapter = get_adapter(model)
    plan = plan_for(adapter, hand_scores(adapter, seed=2), {"hidden_size": 20, "mamba_num_heads": 4,
                                                            "mamba_head_dim": 5})
    model = adapter.apply(plan)
    for i, new in mixers(model).items():
        old, heads, dims = mixers(original)[i], plan.mamba_heads[i], plan.mamba_head_dim[i]
        assert [h // 6 for h in heads] == [0, 0, 1, 1], heads  # 2 heads in each group
        ch = channels_of(heads, dims)
        bc = list(range(2 * INNER, 2 * INNER + 2 * GROUPS * STATE))
        rows = ch + [INNER + c for c in ch] + bc + [2 * INNER + 2 * GROUPS * STATE + h for h in heads]  # z x B C dt
        assert torch.equal(new.in_proj.weight, old.in_proj.weight[rows][:, plan.hidden])
        assert torch.equal(new.in_proj.bias, old.in_proj.bias[rows])
        conv = ch + [INNER + j for j in range(2 * GROUPS * STATE)]
        assert torch.equal(new.conv1d.weight, old.conv1d.weight[conv]) and torch.equal(new.conv1d.bias,
                                                                                     old.conv1d.bias[conv])
        for name in ("A_log", "D", "dt_bias"):
            assert torch.equal(getattr(new, name), getattr(old, name)[heads]), name
        assert torch.equal(new.norm.weight, old.norm.weight[ch])
        assert torch.equal(new.out_proj.weight, old.out_proj.weight[plan.hidden][:, ch])
        assert torch.equal(new.out_proj.bias, old.out_proj.bias[plan.hidden])
        assert (new.num_heads, new.head_dim, new.intermediate_size, new.conv_dim) == (4, 5, 20, 20 + 32)
    ids = tiny_batch()
    assert torch.isfinite(logits_of(model, ids)).all()


def test_calibration_scores_the_x_part_of_in_proj(ssm_family):
    """mamba.{i} is sqrt(sum_b (mean_s |x|)^2) of in_proj's x rows (not z, B, C or dt); heads and head-dim scores
    are its L2 norms over head_dim and over heads."""
    model = tiny_ssm_model(ssm_family)
    adapter = get_adapter(model)
    ids = tiny_batch(3, 16, seed=4)
    outputs = {}
    handles = [m.in_proj.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out))
               for i, m in mixers(model).items()]
    logits_of(model, ids)
    for h in handles:
        h.remove()
    scores = activation_scores(model, adapter, [Batch(ids)])
    for i, out in outputs.items():
        x = out[..., INNER: 2 * INNER]
        expected = x.abs().mean(1).square().sum(0).sqrt()  # (INNER,)
        assert torch.allclose(scores[f"mamba.{i}"], expected, rtol=1e-5), i
        grid = expected.view(HEADS, HEAD_DIM)
        assert torch.allclose(scores[f"mamba_heads.{i}"], grid.norm(dim=1), rtol=1e-5)
        assert torch.allclose(scores[f"mamba_head_dim.{i}"], grid.norm(dim=0), rtol=1e-5)
    assert set(k.split(".")[1] for k in scores if k.startswith("mamba_heads.")) == set(map(str, mixers(model)))


def test_head_dim_ranking_is_l2_across_heads_and_heads_rank_within_groups():
    adapter = get_adapter(tiny_ssm_model("mamba2"))
    raw = torch.full((HEADS, HEAD_DIM), 0.1)
    raw[:, 0] += 0.2 * torch.arange(HEADS)  # head h grows with h: group 1 (heads 6-11) outranks group 0
    raw[3, 2] = 3.0  # head-dim 2: one strong head: L2 3.0, sum 4.1
    raw[:, 5] = 0.8  # head-dim 5: every head moderate: L2 2.8, sum 9.6
    scores = adapter.derive_scores({f"mamba.{i}": raw.flatten() for i in range(4)})
    assert torch.allclose(scores["mamba_head_dim.0"], raw.norm(dim=0))
    assert torch.allclose(scores["mamba_heads.0"], raw.norm(dim=1))
    plan = plan_for(adapter, scores, {"mamba_num_heads": 4, "mamba_head_dim": 2})  # a plan only: never applied
    assert plan.mamba_head_dim[0] == [0, 2], scores["mamba_head_dim.0"]  # L2 over heads; a sum would keep 0, 5
    # the 4 best heads overall are 3, 9, 10, 11; every group keeps 2: its own best
    assert plan.mamba_heads[0] == [3, 5, 10, 11], scores["mamba_heads.0"]


@pytest.mark.parametrize("method", ["magnitude", "taylor", "random"])
def test_baselines_score_the_same_units_as_minitron(ssm_family, method):
    model = tiny_ssm_model(ssm_family)
    adapter = get_adapter(model)
    batches = [Batch(tiny_batch(2, 16))]
    structural = {k for k in activation_scores(model, adapter, batches) if not k.startswith(("hidden.", "block_"))}
    scores = baseline_scores(method, model, adapter, batches, seed=0)
    assert {k for k in scores if not k.startswith("hidden.")} == structural
    for name in structural:
        assert torch.isfinite(scores[name]).all() and (scores[name] >= 0).all(), name
    if method == "magnitude":  # a channel owns its z and x rows, its conv filter and its out_proj column
        i, c = next(iter(mixers(model))), 13
        m = mixers(model)[i]
        owned = torch.cat([m.in_proj.weight[c], m.in_proj.weight[INNER + c], m.conv1d.weight[c].flatten(),
                           m.out_proj.weight[:, c]])
        assert scores[f"mamba.{i}"][c].item() == pytest.approx(owned.norm().item(), rel=1e-5)


# -- parameter counts ---------------------------------------------------------------------------------------------

COUNT_TARGETS = [{}, {"hidden_size": 32}, {"mamba_num_heads": 6, "mamba_head_dim": 4, "hidden_size": 24},
                 {"num_layers": 3}, {"hidden_size": 32, "mamba_num_heads": 8, "num_layers": 2}]


@pytest.mark.parametrize("targets", COUNT_TARGETS, ids=lambda t: "-".join(map(str, t.values())) or "none")
@pytest.mark.parametrize("extra", [{}, {"use_bias": True, "use_conv_bias": False}], ids=["default", "bias"])
def test_count_params_equals_real(ssm_family, targets, extra):
    model = tiny_ssm_model(ssm_family, **extra)
    adapter = get_adapter(model)
    assert adapter.count_params() == real_param_count(model)
    plan = plan_for(adapter, hand_scores(adapter), targets)
    predicted = adapter.count_params(plan.target, plan.kept_layers)  # before pruning: a hypothetical shape
    model = adapter.apply(plan)
    assert predicted == real_param_count(model) == adapter.count_params(), (predicted, real_param_count(model))


# -- bad input ----------------------------------------------------------------------------------------------------


def error_of(dims, targets, family=None) -> str:
    with pytest.raises(PlanError) as info:
        resolve_targets(dims, targets, family=family)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


def test_mamba_heads_must_be_a_multiple_of_n_groups(ssm_family):
    dims = get_adapter(tiny_ssm_model(ssm_family)).dims()
    msg = error_of(dims, {"mamba_num_heads": 9})
    assert "prune.export_config.mamba_num_heads=9 is not a multiple of the model's Mamba n_groups=2" in msg, msg
    assert "choose a multiple of 2" in msg
    assert resolve_targets(dims, {"mamba_num_heads": 10})["mamba_num_heads"] == 10


def test_targets_a_family_lacks_name_the_key_and_the_family():
    llama = get_adapter(tiny_model("llama")).dims()
    msg = error_of(llama, {"mamba_num_heads": 4, "mamba_head_dim": 4}, family="llama")
    assert "prune.export_config.mamba_num_heads=4: the llama family has no such dimension" in msg, msg
    assert "prune.export_config.mamba_head_dim=4: the llama family" in msg
    assert "it can prune hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, num_layers." in msg
    mamba2 = get_adapter(tiny_ssm_model("mamba2")).dims()
    msg = error_of(mamba2, {"ffn_hidden_size": 32, "num_query_groups": 1, "mamba_head_dim": 9, "hiden_size": 3},
                   family="mamba2")
    lines = [line for line in msg.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 4, msg
    assert "ffn_hidden_size=32: the mamba2 family has no such dimension; it can prune hidden_size, num_layers, " \
           "mamba_num_heads, mamba_head_dim" in msg
    assert "num_query_groups=1: the mamba2 family" in msg and "mamba_head_dim=9 is larger than the model's 8" in msg
    assert "Known: hidden_size, num_layers, mamba_num_heads, mamba_head_dim." in msg
    assert "this model has no such dimension" in error_of(mamba2, {"ffn_hidden_size": 32})  # no family given


def test_unset_targets_of_other_families_are_ignored():
    """The CLI passes every TargetsConfig key, most of them null."""
    dims = get_adapter(tiny_model("llama")).dims()
    assert resolve_targets(dims, {"hidden_size": 40, "mamba_num_heads": None, "mamba_head_dim": None},
                           family="llama")["hidden_size"] == 40


def test_plan_without_mamba_scores_says_what_is_missing():
    adapter = get_adapter(tiny_ssm_model("mamba2"))
    scores = {k: v for k, v in hand_scores(adapter).items() if not k.startswith("mamba_heads.")}
    with pytest.raises(PlanError, match=r"'mamba_heads\.<layer>'.*re-run calibration"):
        plan_for(adapter, scores, {"mamba_num_heads": 8})


def test_moe_layers_are_refused_with_the_supported_types():
    with torch.device("meta"):
        model = tiny_ssm_model("nemotron_h", layers_block_type=["linear_attention", "moe", "full_attention"],
                               n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                               moe_shared_expert_intermediate_size=8)
    with pytest.raises(ConfigError) as info:
        get_adapter(model)
    msg = str(info.value)
    assert "[(1, 'moe')]" in msg and "linear_attention (Mamba-2), full_attention, mlp" in msg, msg


# -- export: stock transformers reloads and generates -------------------------------------------------------------


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        ids = torch.cat([ids, logits_of(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids


EXPORT_CASES = {  # mamba2: hidden 32 with 8 heads of 8 keeps hidden * expand == heads * head_dim (expand 2)
    "mamba2": ("mamba2", {}, {"hidden_size": 32, "mamba_num_heads": 8, "num_layers": 3}),
    "mamba2_tied": ("mamba2", {"tie_word_embeddings": True}, {"hidden_size": 24, "mamba_head_dim": 4}),
    "nemotron_h": ("nemotron_h", {}, {"hidden_size": 40, "mamba_num_heads": 8, "mamba_head_dim": 6,
                                      "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1,
                                      "num_layers": 4}),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_reloads_with_stock_transformers_and_generates(case, tmp_path):
    family, extra, targets = EXPORT_CASES[case]
    model = tiny_ssm_model(family, **extra)
    adapter = get_adapter(model)
    model = adapter.apply(plan_for(adapter, hand_scores(adapter), targets, rescale_norms=True))
    to_save, written = exportable_model(model, adapter)
    assert to_save is model and written.startswith(type(model).__name__), written  # the model's own class
    save_hf(to_save, None, tmp_path / "pruned")
    check = verify_export(tmp_path / "pruned", model, tiny_batch(1, 16, seed=9))
    assert check["reloaded_class"] == type(model).__name__ and check["max_abs_logit_diff"] < 1e-5, check
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert real_param_count(reloaded) == adapter.count_params() < get_adapter(tiny_ssm_model(family, **extra)
                                                                              ).count_params()
    assert get_adapter(reloaded).dims() == adapter.dims()
    ids = tiny_batch(1, 12, seed=3)
    generated = reloaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(generated, greedy_without_cache(model, ids, 6))  # the cache path agrees (layer_idx, shapes)


def test_mamba2_targets_must_keep_a_whole_expand():
    """Mamba2Config ties hidden_size * expand to heads * head_dim: other shapes fail before anything is sliced,
    with targets that would work."""
    model = tiny_ssm_model("mamba2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    plan = plan_for(adapter, hand_scores(adapter), {"hidden_size": 40})  # 12 * 8 = 96 is no multiple of 40
    with pytest.raises(PlanError) as info:
        model = adapter.apply(plan)
    msg = str(info.value)
    assert "hidden_size=40 and mamba_num_heads * mamba_head_dim = 12 * 8 = 96, not a multiple of 40" in msg, msg
    assert "For expand=2 choose mamba_num_heads=10 or hidden_size=48." in msg, msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and adapter.dims()["hidden_size"] == 48
    with pytest.raises(PlanError, match="not a multiple of 40"):  # the pipeline's check before calibration
        check_exportable(adapter, resolve_targets(adapter.dims(), {"hidden_size": 40}))
    check_exportable(adapter, resolve_targets(adapter.dims(), {"hidden_size": 40, "mamba_num_heads": 10}))
