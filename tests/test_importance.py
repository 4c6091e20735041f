"""Importance scores against straightforward references: the Minitron aggregation, padding, Block Importance,
depth removal by really deleting layers, and the baseline scorers' format."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_model
from torch import nn

from llmprune.adapters import get_adapter
from llmprune.data import Batch
from llmprune.importance.activation import activation_scores
from llmprune.importance.baselines import baseline_scores, magnitude_scores, random_scores, taylor_scores
from llmprune.importance.depth import removal_scores

RAW_PREFIXES = ("ffn.", "attn.", "hidden.")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_scores_close(actual: dict, expected: dict, names, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for name in names:
        a, e = actual[name], expected[name]
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert torch.allclose(a, e, rtol=rtol, atol=atol), f"{name}: max abs diff {(a - e).abs().max():.3g}"


def is_raw(name: str) -> bool:
    return name.startswith(RAW_PREFIXES) and name != "hidden"


# -- (a) the aggregation formula ------------------------------------------------------------------------------


def test_activation_score_is_l2_over_samples_of_mean_abs_over_sequence(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = model.model.layers[1]
    captured: dict[str, list[torch.Tensor]] = {"ffn": [], "attn": [], "norm": []}
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured["ffn"].append(args[0].clone())),
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured["attn"].append(args[0].clone())),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured["norm"].append(out.clone())),
    ]
    batches = [Batch(tiny_batch(3, 16, seed=1)), Batch(tiny_batch(2, 16, seed=2))]
    scores = activation_scores(model, adapter, batches)
    for handle in handles:
        handle.remove()

    def manual(acts: list[torch.Tensor]) -> torch.Tensor:
        per_sample = torch.cat([a.abs().mean(dim=1) for a in acts])  # (N, C): mean over the sequence
        assert per_sample.shape[0] == 5
        return per_sample.square().sum(0).sqrt()  # L2 over samples

    assert_scores_close(scores, {"ffn.1": manual(captured["ffn"]), "attn.1": manual(captured["attn"]),
                                 "hidden.1.post_attention_layernorm": manual(captured["norm"])},
                        ["ffn.1", "attn.1", "hidden.1.post_attention_layernorm"])
    attn = manual(captured["attn"])
    assert torch.allclose(scores["heads.1"], attn.view(6, 8).norm(dim=1), rtol=1e-5)
    hidden = sum(scores[f"hidden.{i}.{n}"] for i in range(4) for n in ("input_layernorm", "post_attention_layernorm"))
    assert torch.allclose(scores["hidden"], hidden, rtol=1e-6)
    assert scores["ffn.1"].shape == (80,) and scores["hidden"].shape == (48,) and scores["heads.1"].shape == (6,)


def test_calibration_leaves_the_model_as_it_was():
    model = tiny_model("llama").train()
    adapter = get_adapter(model)
    activation_scores(model, adapter, [Batch(tiny_batch())])
    assert model.training
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.modules())


# -- (b) padding never enters a score -------------------------------------------------------------------------


def padded_batch(side: str, pad_id: int = 1):
    """Three samples of real lengths 16, 10 and 7 in one (3, 16) batch, padded on `side`."""
    ids = tiny_batch(3, 16, seed=9)
    lengths = [16, 10, 7]
    mask = torch.zeros_like(ids)
    samples = []
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
            samples.append(ids[b: b + 1, :n])
        else:
            mask[b, 16 - n:] = 1
            samples.append(ids[b: b + 1, 16 - n:])
    padded = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return padded, mask, samples, lengths


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_enters_a_score(family, side):
    model = tiny_model(family)
    adapter = get_adapter(model)
    padded, mask, samples, lengths = padded_batch(side)
    scores = activation_scores(model, adapter, [Batch(padded, mask)])
    # Reference: each sample alone, unpadded. Sums of squares add over samples; BI is a token-weighted mean.
    alone = [activation_scores(model, adapter, [Batch(s)]) for s in samples]
    raw = {name: torch.stack([a[name] for a in alone]).square().sum(0).sqrt() for name in alone[0] if is_raw(name)}
    expected = adapter.derive_scores(raw)
    expected["block_importance"] = sum(a["block_importance"] * n for a, n in zip(alone, lengths)) / sum(lengths)
    # left padding shifts the positions of real tokens; RoPE makes that an exact identity only up to rounding
    tol = 1e-5 if side == "right" else 1e-4
    assert_scores_close(scores, expected, list(expected), rtol=tol, atol=tol)

    # and the pad tokens' identity does not matter
    other = activation_scores(model, adapter, [Batch(torch.where(mask.bool(), padded, 77), mask)])
    assert_scores_close(scores, other, list(scores), rtol=1e-6, atol=1e-7)


def test_all_ones_mask_equals_no_mask():
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    ids = tiny_batch(3, 16)
    a = activation_scores(model, adapter, [Batch(ids)])
    b = activation_scores(model, adapter, [Batch(ids, torch.ones_like(ids))])
    assert_scores_close(a, b, list(a), rtol=1e-6)


# -- (c) Block Importance -------------------------------------------------------------------------------------


def test_block_importance_is_one_minus_cosine_of_layer_input_and_output(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = [Batch(tiny_batch(2, 16, seed=3)), Batch(tiny_batch(3, 12, seed=4))]
    scores = activation_scores(model, adapter, batches)
    totals, tokens = torch.zeros(4), 0
    last_out: list[torch.Tensor] = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: last_out.append(out))
    for batch in batches:
        last_out.clear()
        with torch.no_grad():
            states = model.model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
        assert len(states) == 5
        outputs = list(states[1:4]) + [last_out[0]]  # states[4] is after the final norm
        for i in range(4):
            totals[i] += (1 - F.cosine_similarity(states[i], outputs[i], dim=-1)).sum()
        tokens += batch.input_ids.numel()
    handle.remove()
    assert torch.allclose(scores["block_importance"], totals / tokens, rtol=1e-5, atol=1e-6)
    assert scores["block_importance"].shape == (4,)


# -- (d) depth removal scores against really deleting the layers -------------------------------------------------


def without_layers(model, removed: list[int]):
    """The straightforward reference: a copy of the model whose layers are really gone."""
    copy_ = copy.deepcopy(model)
    keep = [i for i in range(len(copy_.model.layers)) if i not in removed]
    copy_.model.layers = nn.ModuleList(copy_.model.layers[i] for i in keep)
    copy_.config.num_hidden_layers = len(keep)
    if getattr(copy_.config, "layer_types", None) is not None:
        copy_.config.layer_types = [copy_.config.layer_types[i] for i in keep]
    return copy_


def mean_loss(model, batches, metric: str, teacher=None) -> float:
    total, tokens = 0.0, 0.0
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).logits[:, :-1].float()
        mask = torch.ones_like(batch.input_ids) if batch.attention_mask is None else batch.attention_mask
        valid = mask[:, 1:].float()
        if metric == "lm_loss":
            per_token = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False).logits[:, :-1]
            t = F.log_softmax(t_logits.float(), dim=-1)
            per_token = F.kl_div(F.log_softmax(logits, dim=-1), t, log_target=True, reduction="none").sum(-1)
        total += float((per_token * valid).sum())
        tokens += float(valid.sum())
    return total / tokens


def depth_batches():
    ids = tiny_batch(2, 16, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding in one sample
    return [Batch(tiny_batch(2, 16, seed=5)), Batch(torch.where(mask.bool(), ids, 1), mask)]


@pytest.mark.parametrize("metric", ["lm_loss", "kl"])
def test_removal_scores_equal_deleting_the_layers(family, metric):
    model = tiny_model(family, num_hidden_layers=5)  # 5 + 4 + 3 candidates
    adapter = get_adapter(model)
    batches = depth_batches()
    scores = removal_scores(model, adapter, batches, metric=metric, drop_one=True, block_sizes=(2, 3))
    assert set(scores) == {f"depth.drop_one.{metric}", f"depth.contiguous.{metric}.n2",
                           f"depth.contiguous.{metric}.n3"}
    base = mean_loss(model, batches, metric, teacher=model)
    if metric == "kl":
        assert base == pytest.approx(0.0, abs=1e-6)

    def reference(removed):
        return mean_loss(without_layers(model, removed), batches, metric, teacher=model) - base

    expected = {
        f"depth.drop_one.{metric}": [reference([i]) for i in range(5)],
        f"depth.contiguous.{metric}.n2": [reference([s, s + 1]) for s in range(4)],
        f"depth.contiguous.{metric}.n3": [reference([s, s + 1, s + 2]) for s in range(3)],
    }
    for name, values in expected.items():
        assert torch.allclose(scores[name], torch.tensor(values), rtol=1e-4, atol=2e-5), (name, scores[name], values)
    assert (scores[f"depth.drop_one.{metric}"] != 0).all()


@pytest.mark.parametrize("family_", ["qwen2", "qwen3"])
def test_removal_scores_with_mixed_sliding_and_full_layers(family_):
    """Layers 0-1 full attention, 2-3 a 4-token sliding window: each re-run layer needs its own mask."""
    model = tiny_model(family_, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    adapter = get_adapter(model)
    batches = depth_batches()
    scores = removal_scores(model, adapter, batches, drop_one=True, block_sizes=(2,))
    base = mean_loss(model, batches, "lm_loss")
    drop_one = [mean_loss(without_layers(model, [i]), batches, "lm_loss") - base for i in range(4)]
    blocks = [mean_loss(without_layers(model, [s, s + 1]), batches, "lm_loss") - base for s in range(3)]
    assert torch.allclose(scores["depth.drop_one.lm_loss"], torch.tensor(drop_one), rtol=1e-4, atol=2e-5)
    assert torch.allclose(scores["depth.contiguous.lm_loss.n2"], torch.tensor(blocks), rtol=1e-4, atol=2e-5)


def test_removal_scores_leave_the_model_as_it_was():
    model = tiny_model("llama").train()
    adapter = get_adapter(model)
    ids = tiny_batch()
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    model.train()
    removal_scores(model, adapter, [Batch(ids)], drop_one=True, block_sizes=(2,))
    assert model.training and len(model.model.layers) == 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, before)


# -- baselines ------------------------------------------------------------------------------------------------


def structural_names(scores: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in scores.items() if k == "hidden" or k.startswith(("ffn.", "heads."))}


@pytest.mark.parametrize("method", ["magnitude", "random", "taylor"])
def test_baselines_have_the_activation_score_format(family, method):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = [Batch(tiny_batch(2, 16))]
    reference = structural_names(activation_scores(model, adapter, batches))
    assert len(reference) == 1 + 2 * 4
    scores = baseline_scores(method, model, adapter, batches, seed=0)
    assert structural_names(scores) == reference
    for name in reference:
        assert scores[name].dtype == torch.float32 and torch.isfinite(scores[name]).all() and (scores[name] >= 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_unknown_baseline_lists_the_choices():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="Known: activation, magnitude, taylor, random"):
        baseline_scores("l1", model, get_adapter(model), [])


def test_magnitude_is_the_norm_of_the_weights_a_unit_owns():
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    scores = magnitude_scores(adapter)
    layer = model.model.layers[2]
    mlp, attn = layer.mlp, layer.self_attn
    n = 17
    expected = torch.cat([mlp.gate_proj.weight[n], mlp.up_proj.weight[n], mlp.down_proj.weight[:, n]]).norm()
    assert scores["ffn.2"][n].item() == pytest.approx(expected.item(), rel=1e-5)
    h = 4  # head 4 owns q_proj rows 32..39 and o_proj columns 32..39
    expected = torch.cat([attn.q_proj.weight[32:40].flatten(), attn.o_proj.weight[:, 32:40].flatten()]).norm()
    assert scores["heads.2"][h].item() == pytest.approx(expected.item(), rel=1e-5)
    c = 5
    owners = [model.model.embed_tokens.weight[:, c]]
    for lay in model.model.layers:
        owners += [lay.self_attn.q_proj.weight[:, c], lay.self_attn.k_proj.weight[:, c],
                   lay.self_attn.v_proj.weight[:, c], lay.self_attn.o_proj.weight[c], lay.mlp.gate_proj.weight[:, c],
                   lay.mlp.up_proj.weight[:, c], lay.mlp.down_proj.weight[c]]
    owners.append(model.lm_head.weight[:, c])  # untied: the LM head reads the channel too
    assert scores["hidden"][c].item() == pytest.approx(torch.cat(owners).norm().item(), rel=1e-5)


def test_random_scores_depend_on_the_seed_only():
    adapter = get_adapter(tiny_model("llama"))
    a, b, c = random_scores(adapter, seed=0), random_scores(adapter, seed=0), random_scores(adapter, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ffn.0"], c["ffn.0"])


def test_taylor_is_first_order_loss_change_per_unit():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = tiny_batch(2, 16)
    scores = taylor_scores(model, adapter, [Batch(ids)])
    logits = model(input_ids=ids).logits[:, :-1]
    F.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).backward()
    mlp = model.model.layers[1].mlp
    wg = {name: (p.weight * p.weight.grad).detach() for name, p in (("gate", mlp.gate_proj), ("up", mlp.up_proj),
                                                                    ("down", mlp.down_proj))}
    expected = (wg["gate"].sum(1) + wg["up"].sum(1) + wg["down"].sum(0)).abs()
    assert torch.allclose(scores["ffn.1"], expected, rtol=1e-4, atol=1e-8)


def test_taylor_works_on_a_frozen_model_and_ignores_padding():
    """The pipeline freezes the teacher before calibration; padded positions must not reach the scores."""
    model = tiny_model("llama").requires_grad_(False)
    adapter = get_adapter(model)
    ids = tiny_batch(2, 16)
    frozen = taylor_scores(model, adapter, [Batch(ids)])
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # left as it was
    assert frozen["ffn.1"].abs().sum() > 0

    # row 1 is 10 real tokens then padding (left-aligned): its padded tail must change nothing
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    noisy = ids.clone()
    noisy[1, 10:] = (noisy[1, 10:] + 7) % model.config.vocab_size
    a = taylor_scores(model, adapter, [Batch(ids, mask)])
    b = taylor_scores(model, adapter, [Batch(noisy, mask)])
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-9) for k in a)
    assert not torch.allclose(a["ffn.1"], frozen["ffn.1"])
