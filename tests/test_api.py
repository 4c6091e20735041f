"""The ModelOpt-like Python API: llmprune.prune and llmprune.compute_scores on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

import llmprune
from llmprune.adapters import get_adapter
from llmprune.config import ConfigError
from llmprune.plan import PlanError

TARGETS = {"hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "num_layers": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def calib() -> torch.Tensor:
    return tiny_batch(6, 16, seed=3)


def test_prune_returns_the_pruned_model_and_its_plan(family):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, plan = llmprune.prune(model, export_config=TARGETS, calib_data=calib(), batch_size=2)
    assert pruned is not model and model.config.hidden_size == 48  # the original stays usable as the teacher
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers) == (32, 48, 4, 2, 3)
    assert plan.target == {**plan.original, **TARGETS} and plan.family == "llama"
    assert len(plan.kept_layers) == 3 and plan.depth["method"] == "drop_one"
    assert len(pruned.model.layers) == 3
    layer = pruned.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 32) and layer.mlp.down_proj.weight.shape == (32, 48)
    with torch.no_grad():
        logits = pruned(input_ids=tiny_batch()).logits
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    assert get_adapter(pruned).count_params() == sum(p.numel() for p in pruned.parameters())


def test_compute_scores_then_prune_gives_the_same_plan():
    kwargs = dict(depth_method="drop_one", depth_metric="kl", depth_samples=4, batch_size=2)
    _, direct = llmprune.prune(tiny_model("qwen3"), export_config=TARGETS, calib_data=calib(), **kwargs)
    model = tiny_model("qwen3")
    scores = llmprune.compute_scores(model, calib(), export_config=TARGETS, **kwargs)
    assert "depth.drop_one.kl" in scores and scores["depth.drop_one.kl"].shape == (4,)
    _, via_scores = llmprune.prune(model, export_config=TARGETS, scores=scores, depth_method="drop_one",
                                   depth_metric="kl")
    assert via_scores.to_json() == direct.to_json()


def test_compute_scores_skips_depth_when_no_layer_is_removed():
    scores = llmprune.compute_scores(tiny_model("llama"), calib(), export_config={"hidden_size": 32})
    assert not any(name.startswith("depth.") for name in scores)
    assert "block_importance" in scores and "hidden" in scores


@pytest.mark.parametrize("depth_method", ["block_importance", "contiguous"])
def test_prune_with_other_depth_methods(depth_method):
    model = tiny_model("mistral")
    model, plan = llmprune.prune(model, export_config={"num_layers": 2}, calib_data=calib(),
                                 depth_method=depth_method)
    assert plan.depth["method"] == depth_method and len(plan.kept_layers) == 2
    if depth_method == "contiguous":
        assert plan.depth["removed"][1] == plan.depth["removed"][0] + 1
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2


@pytest.mark.parametrize("importance", ["magnitude", "random", "taylor"])
def test_prune_with_baseline_importance(importance):
    model = tiny_model("qwen2")
    _, plan = llmprune.prune(model, export_config={"ffn_hidden_size": 40, "num_query_groups": 1},
                             calib_data=calib(), importance=importance)
    assert len(plan.ffn[0]) == 40 and all(len(g) == 1 for g in plan.groups.values())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tiny_batch()).logits).all()


def test_prune_accepts_padded_batches():
    ids = calib()
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    _, plan = llmprune.prune(tiny_model("llama"), export_config={"hidden_size": 40}, calib_data=batches)
    assert len(plan.hidden) == 40


def test_depth_scores_ignore_padding():
    """Padding must not enter the depth scores either: the pad tokens' identity changes nothing."""
    ids = calib()
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 5:] = 0

    def scores_with_pad(pad_id: int) -> dict:
        padded = torch.where(mask.bool(), ids, pad_id)
        batches = [{"input_ids": padded[i: i + 3], "attention_mask": mask[i: i + 3]} for i in (0, 3)]
        return llmprune.compute_scores(tiny_model("llama"), batches, export_config={"num_layers": 3}, depth_samples=6)

    a, b = scores_with_pad(1), scores_with_pad(77)
    assert torch.allclose(a["depth.drop_one.lm_loss"], b["depth.drop_one.lm_loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(a["ffn.0"], b["ffn.0"], rtol=1e-5, atol=1e-7)


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("export_config", [None, {}])
def test_prune_rejects_empty_export_config(export_config):
    with pytest.raises(ConfigError, match="export_config is empty.*hidden_size"):
        llmprune.prune(tiny_model("llama"), export_config=export_config, calib_data=calib())


def test_prune_rejects_unknown_mode_and_targets_with_gradnas():
    with pytest.raises(ConfigError, match="Unknown mode 'fastnas'. Known: minitron, gradnas"):
        llmprune.prune(tiny_model("llama"), mode="fastnas", export_config=TARGETS, calib_data=calib())
    with pytest.raises(ConfigError, match="mode='gradnas' chooses per-layer widths from `constraints`"):
        llmprune.prune(tiny_model("llama"), mode="gradnas", export_config=TARGETS, calib_data=calib())


def test_prune_needs_calib_data_or_scores():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="calib_data"):
        llmprune.prune(model, export_config=TARGETS)
    assert model.config.hidden_size == 48 and model.model.embed_tokens.weight.shape == (128, 48)


def test_prune_checks_targets_before_calibrating():
    model = tiny_model("llama")

    class Exploding:
        def __iter__(self):
            raise AssertionError("calibration should not start")

    with pytest.raises(PlanError) as info:
        llmprune.prune(model, export_config={"hidden_size": 64, "num_heads": 2}, calib_data=Exploding())
    msg = str(info.value)
    assert "export_config.hidden_size=64" in msg and "export_config.num_heads" in msg
    assert "prune.export_config" not in msg
    assert model.config.hidden_size == 48


def test_prune_rejects_unsupported_families():
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(ConfigError, match="Unsupported model family 'gpt2'. Supported: llama, mistral, qwen2, qwen3"):
        llmprune.prune(transformers.GPT2LMHeadModel(config), export_config=TARGETS, calib_data=calib())
