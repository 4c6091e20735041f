"""The cost model reads the pruning map: its parameter count equals the real one and its FLOPs equal what
torch's FlopCounterMode counts, on tiny models of every family, before pruning and after (predicted beforehand)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, SSM_FAMILIES, tiny_batch, tiny_model, tiny_ssm_model
from helpers import plan_with_random_scores, real_param_count
from torch.utils.flop_counter import FlopCounterMode

from llmprune.adapters import get_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = {  # per family: pruned shapes that touch every dimension it has, depth included
    "llama": {"hidden_size": 40, "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1,
              "num_layers": 3},
    "mistral": {"ffn_hidden_size": 64, "num_attention_heads": 2, "num_query_groups": 1},
    "qwen2": {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2},
    "qwen3": {"hidden_size": 40, "ffn_hidden_size": 48, "num_query_groups": 1},
    "mamba2": {"hidden_size": 32, "mamba_num_heads": 8, "num_layers": 3},
    "nemotron_h": {"hidden_size": 40, "ffn_hidden_size": 48, "num_attention_heads": 4, "mamba_num_heads": 8,
                   "mamba_head_dim": 6, "num_layers": 4},
}


def build(family: str, tied: bool):
    make = tiny_ssm_model if family in SSM_FAMILIES else tiny_model
    model = make(family, tie_word_embeddings=tied)
    model.set_attn_implementation("eager")  # sdpa's CPU kernel is invisible to FlopCounterMode
    return model


def counted_flops(model, seq_len: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=tiny_batch(1, seq_len), use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", [*FAMILIES, *SSM_FAMILIES])
def test_params_and_flops_equal_the_counted_ones(family, tied):
    model = build(family, tied)
    adapter = get_adapter(model)
    cost = adapter.cost_model()
    assert cost.params() == real_param_count(model)
    for seq_len in (1, 13, 16):  # 13: a partial Mamba chunk (chunk_size 8)
        assert cost.flops(seq_len) == counted_flops(model, seq_len), (family, seq_len)

    plan = plan_with_random_scores(adapter, TARGETS[family], rescale_norms=True)
    predicted = {"params": cost.params(plan.target, plan.kept_layers),
                 "flops": cost.flops(13, plan.target, plan.kept_layers)}
    pruned = adapter.apply(plan)
    assert predicted == {"params": real_param_count(pruned), "flops": counted_flops(pruned, 13)}
    assert predicted["params"] < cost.params() and predicted["flops"] < cost.flops(13)
    after = get_adapter(pruned).cost_model()
    assert (after.params(), after.flops(13)) == (predicted["params"], predicted["flops"])


@pytest.mark.parametrize("family", ["llama", "nemotron_h", "mamba2"])
def test_memory_is_weights_plus_cache(family):
    model = build(family, tied=False)
    adapter = get_adapter(model)
    cost = adapter.cost_model()
    c = model.config
    mem = cost.memory(dtype="bfloat16", batch_size=3, seq_len=100)
    assert mem["weights"] == 2 * real_param_count(model)
    types = getattr(c, "layers_block_type", None)
    attention_layers = types.count("full_attention") if types else (0 if family == "mamba2" else c.num_hidden_layers)
    kv_heads = getattr(c, "num_key_value_heads", 0)
    assert mem["kv_cache"] == attention_layers * 2 * kv_heads * 8 * 100 * 3 * 2
    if family != "llama":
        mamba_layers = types.count("linear_attention") if types else c.num_hidden_layers
        conv_dim = 12 * 8 + 2 * 2 * 8
        assert mem["ssm_state"] == mamba_layers * (conv_dim * 4 + 12 * 8 * 8) * 3 * 2
    assert mem["total"] == mem["weights"] + mem["kv_cache"] + mem["ssm_state"]
