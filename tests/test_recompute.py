"""Recomputed products (llmprune.distill.recompute): the same bits for less memory."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import FAMILIES, SSM_FAMILIES, tiny_batch, tiny_model, tiny_ssm_model

from llmprune.config import DistillConfig
from llmprune.distill import recompute
from llmprune.distill.train import Student, distill_loss, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ENCODER_AND_GPTJ = {  # the GradNAS families: GELU MLPs, LayerNorm, GPT-J's tanh GELU made of products
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2)),
    "gptj": lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=128, n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, n_inner=48)),
}
SILU_FAMILIES = [*FAMILIES, *SSM_FAMILIES]


def build(family: str, **overrides):
    torch.manual_seed(0)
    if family in ENCODER_AND_GPTJ:
        return ENCODER_AND_GPTJ[family]().train()
    return (tiny_model if family in FAMILIES else tiny_ssm_model)(family, **overrides).train()


def step(model, ids, on: bool, autocast):
    """Loss and every gradient of one forward + backward; with `on`, recompute_products' hooks, counting the recipes
    made (their nodes' names)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (BERT)
    made = []

    def counting(t):
        r = recompute.recipe(t)
        if r is not None:
            made.append(r.node.name())
        return r or t

    hooks = torch.autograd.graph.saved_tensors_hooks(counting, recompute.Unpacker()) if on else nullcontext()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None), hooks:
        loss = model(input_ids=ids).logits.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, made


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("family", [*SILU_FAMILIES, *ENCODER_AND_GPTJ])
def test_recomputed_products_give_bitwise_the_same_loss_and_gradients(family, autocast):
    model, ids = build(family), tiny_batch(2, 16)
    loss, grads, _ = step(model, ids, False, autocast)
    loss_r, grads_r, made = step(model, ids, True, autocast)
    expected = {"MulBackward0", "SiluBackward0"} if family in SILU_FAMILIES else {"MulBackward0"}
    if family == "bert":
        expected = set()  # LayerNorm and exact GELU: nothing qualifies, and nothing changes
    assert expected <= set(made), f"{family}: {expected} not recomputed ({made})"
    assert torch.equal(loss, loss_r)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_r[name]), name


def kept_bytes(model, ids, on: bool, autocast: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages autograd keeps for backward, other than parameters and autocast's cached copies
    of them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        r = recompute.recipe(t) if on else None
        weight_copy = t.grad_fn is not None and t.grad_fn.name() == "TBackward0"  # a (cast) parameter, transposed
        if r is None and t.untyped_storage().data_ptr() not in params and not weight_copy:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return r or t

    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        with torch.autograd.graph.saved_tensors_hooks(pack, recompute.Unpacker()):
            loss = model(input_ids=ids).logits.float().sum()
    loss.backward()
    return sum(kept.values())


def test_a_decoder_keeps_half_its_activations_fewer():
    """Per token and layer a llama keeps norm inputs 2H, normalised 2H, norm outputs 2H, attention ~4 x heads x
    head_dim, gate and up 2I, SiLU output and product 2I; the normalised states, the norm outputs, the SiLU output and
    the product are recomputed: 4H + 2I of them."""
    model, ids = build("llama", hidden_size=72, intermediate_size=160), tiny_batch(2, 32)
    plain, lean = kept_bytes(model, ids, False), kept_bytes(model, ids, True)
    tokens, layers = ids.numel(), model.config.num_hidden_layers
    recomputed = 4 * (4 * 72 + 2 * 160) * tokens * layers  # float32
    assert plain - lean >= recomputed, (plain, lean, recomputed)
    assert lean < 0.6 * plain, (plain, lean)


def test_autocast_copies_of_products_are_made_again(monkeypatch):
    """Under bfloat16 autocast each projection casts its input itself: q, k and v three copies of the attention norm's
    output, gate and up two of the MLP norm's, 5H bfloat16 values per token and layer that are casts of recomputed
    products. Without the cast recipe (CAST matching nothing) they are kept."""
    model, ids = build("llama", hidden_size=72, intermediate_size=160), tiny_batch(2, 32)
    with_casts = kept_bytes(model, ids, True, torch.bfloat16)
    monkeypatch.setattr(recompute, "CAST", "no such node")
    without = kept_bytes(model, ids, True, torch.bfloat16)
    copies = 5 * 72 * 2 * ids.numel() * model.config.num_hidden_layers
    assert without - with_casts == copies, (without, with_casts, copies)


def test_training_with_and_without_recomputation_is_bitwise_the_same(tmp_path):
    """train(): metrics and trained weights identical, two micro-batches a step (the recipes of one micro-batch never
    meet another's)."""
    teacher = tiny_model("llama").requires_grad_(False)
    windows = tiny_batch(8, 16)
    results = []
    for on in (False, True):
        student = tiny_model("llama", seed=1, hidden_size=24, intermediate_size=40).train()
        cfg = SimpleNamespace(**{**vars(DistillConfig()), "max_steps": 3, "micro_batch_size": 1,
                                 "global_batch_size": 2, "lr": 1e-2, "precision": "fp32", "recompute_products": on,
                                 "eval_every": 100, "save_every": 100})
        run_dir = tmp_path / str(on)
        run_dir.mkdir()
        rows = train(Student(student), windows, distill_loss(teacher, cfg, ()), cfg, run_dir, "distill", "fp")
        results.append(([json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rows],
                        {n: p.detach().clone() for n, p in student.named_parameters()}))
    (rows_off, weights_off), (rows_on, weights_on) = results
    assert rows_off == rows_on
    assert all(torch.equal(weights_off[n], weights_on[n]) for n in weights_off)
    initial = tiny_model("llama", seed=1, hidden_size=24, intermediate_size=40).state_dict()
    assert not any(torch.equal(initial[n], weights_on[n]) for n in weights_on if "mlp" in n)  # it did train
