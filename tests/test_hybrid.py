"""Nemotron-H hybrid pruning (Mamba + MLP + attention layers) and the two Mamba recipes.

Depth pruning keeps config.layers_block_type equal to the kept layers' types and computes what the original
computes with the removed layers skipped; FFN and attention units exist only on their own layer types. The recipe
tier runs nemotronh_minitron and mamba2_minitron end to end on tiny random models and checks their published
targets on the real architectures (meta device, no weights).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from conftest import HYBRID_PATTERN, save_tiny, tiny_batch, tiny_run_overrides, tiny_ssm_model
from test_mamba import assert_close, blocks, greedy_without_cache, hand_scores, logits_of, plan_for, real_param_count
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.adapters import get_adapter
from llmprune.data import Batch
from llmprune.export.hf import exportable_model
from llmprune.importance.activation import activation_scores
from llmprune.plan import PlanError, PruningPlan, make_plan

MLP_LAYERS, ATTENTION_LAYERS, MAMBA_LAYERS = [1, 3], [2, 5], [0, 4]  # HYBRID_PATTERN: M - * - M *


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def skipping(model, removed: list[int]):
    """A copy of `model` whose layers `removed` pass their input through (forward hooks): the reference for depth."""
    reference = copy.deepcopy(model)
    for i in removed:
        blocks(reference)[i].register_forward_hook(lambda mod, args, kwargs, out: args[0] if args else
                                                   kwargs["hidden_states"], with_kwargs=True)
    return reference


def drop_one_scores(adapter, removed: list[int]) -> dict[str, torch.Tensor]:
    scores = hand_scores(adapter)
    scores["depth.drop_one.lm_loss"][removed] = 0  # hand_scores are 1 .. 2: these are the cheapest to remove
    return scores


# -- depth --------------------------------------------------------------------------------------------------------


def test_depth_keeps_the_layer_pattern_and_skips_the_removed_layers(tmp_path):
    model = tiny_ssm_model("nemotron_h")
    reference = skipping(model, [1, 2])
    adapter = get_adapter(model)
    plan = plan_for(adapter, drop_one_scores(adapter, [1, 2]), {"num_layers": 4})
    assert plan.kept_layers == [0, 3, 4, 5] and plan.depth["removed"] == [1, 2]
    assert plan.depth["removed_types"] == ["mlp", "full_attention"]
    assert PruningPlan.from_json(plan.to_json()) == plan
    model = adapter.apply(plan)
    expected_types = ["linear_attention", "mlp", "linear_attention", "full_attention"]
    assert model.config.layers_block_type == expected_types and model.config.num_hidden_layers == 4
    assert model.config.hybrid_override_pattern == "M-M*"
    assert [b.block_type for b in blocks(model)] == expected_types
    assert [b.layer_idx for b in blocks(model)] == [0, 1, 2, 3]
    assert [getattr(b.mixer, "layer_idx", None) for b in blocks(model)] == [0, None, 2, 3]  # cache slots
    ids = tiny_batch()
    assert_close(logits_of(model, ids), logits_of(reference, ids))
    assert real_param_count(model) == adapter.count_params()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layers_block_type == expected_types
    assert_close(logits_of(reloaded, ids), logits_of(model, ids))
    prompt = tiny_batch(1, 10, seed=2)
    generated = reloaded.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=1)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 5))


def test_python_api_prunes_a_hybrid_in_one_call():
    model = tiny_ssm_model("nemotron_h")
    ids = tiny_batch(4, 16, seed=8)
    model, plan = llmprune.prune(model, export_config={"mamba_num_heads": 8, "mamba_head_dim": 6, "num_layers": 5},
                                 calib_data=ids, depth_samples=2, batch_size=2)
    assert len(plan.depth["removed"]) == 1 and plan.depth["removed_types"] == [
        HYBRID_PATTERN[i] for i in plan.depth["removed"]]
    assert sorted(plan.mamba_heads) == sorted(plan.mamba_head_dim) == [i for i in MAMBA_LAYERS if i in plan.kept_layers]
    assert model.config.layers_block_type == [HYBRID_PATTERN[i] for i in plan.kept_layers]
    assert get_adapter(model).dims()["mamba_num_heads"] == 8 and torch.isfinite(logits_of(model, ids)).all()
    with pytest.raises(PlanError, match=r"export_config\.ffn_hidden_size=32: the mamba2 family has no such"):
        llmprune.prune(tiny_ssm_model("mamba2"), export_config={"ffn_hidden_size": 32}, scores={})


# -- FFN and attention units live on their own layer types --------------------------------------------------------


def test_ffn_and_heads_are_planned_only_on_their_layers_and_zeroed_units_prune_exactly():
    model = tiny_ssm_model("nemotron_h")
    gen = torch.Generator().manual_seed(4)
    dead_ffn = {i: sorted(torch.randperm(80, generator=gen)[:32].tolist()) for i in MLP_LAYERS}
    dead_heads = {2: [1, 4], 5: [0, 5]}  # one per KV group (heads 0-2 and 3-5)
    with torch.no_grad():
        for i, neurons in dead_ffn.items():
            blocks(model)[i].mixer.up_proj.weight[neurons] = 0
        for i, heads in dead_heads.items():
            for h in heads:
                blocks(model)[i].mixer.o_proj.weight[:, h * 8: (h + 1) * 8] = 0
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    scores = activation_scores(model, adapter, [Batch(tiny_batch(4, 16, seed=5))])  # relu2(0) = 0: ranked last
    assert {k for k in scores if k.startswith(("ffn.", "heads.", "mamba_heads."))} == {
        *(f"ffn.{i}" for i in MLP_LAYERS), *(f"heads.{i}" for i in ATTENTION_LAYERS),
        *(f"mamba_heads.{i}" for i in MAMBA_LAYERS)}
    for i, heads in dead_heads.items():
        scores[f"heads.{i}"][heads] = 0  # o_proj columns do not zero the o_proj input Minitron reads
    plan = plan_for(adapter, scores, {"ffn_hidden_size": 48, "num_attention_heads": 4})
    assert plan.ffn == {i: [n for n in range(80) if n not in dead_ffn[i]] for i in MLP_LAYERS}
    assert plan.heads == {i: [h for h in range(6) if h not in dead_heads[i]] for i in ATTENTION_LAYERS}
    assert plan.groups == {2: [0, 1], 5: [0, 1]} and plan.mamba_heads is None
    model = adapter.apply(plan)
    for i in MLP_LAYERS:
        m = blocks(model)[i].mixer
        assert m.up_proj.weight.shape == (48, 48) and m.down_proj.weight.shape == (48, 48)
    for i in ATTENTION_LAYERS:
        m = blocks(model)[i].mixer
        assert m.q_proj.weight.shape == (32, 48) and m.k_proj.weight.shape == (16, 48)
        assert m.o_proj.weight.shape == (48, 32) and m.num_key_value_groups == 2
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (48, 4, 2)
    assert_close(logits_of(model, ids), before)


def test_removing_a_query_group_removes_its_kv_head_and_query_heads():
    model = tiny_ssm_model("nemotron_h")
    with torch.no_grad():  # group 1 of layer 2, group 0 of layer 5 output exactly zero
        blocks(model)[2].mixer.v_proj.weight[8:16] = 0
        blocks(model)[5].mixer.v_proj.weight[0:8] = 0
    ids = tiny_batch()
    before = logits_of(model, ids)
    adapter = get_adapter(model)
    scores = activation_scores(model, adapter, [Batch(tiny_batch(4, 16, seed=5))])
    plan = plan_for(adapter, scores, {"num_query_groups": 1})
    assert plan.groups == {2: [0], 5: [1]} and plan.heads == {2: [0, 1, 2], 5: [3, 4, 5]}
    model = adapter.apply(plan)
    assert_close(logits_of(model, ids), before)


def test_hybrid_count_needs_the_kept_layers_when_depth_changes():
    adapter = get_adapter(tiny_ssm_model("nemotron_h"))
    with pytest.raises(ValueError, match="pass kept_layers"):
        adapter.count_params({"num_layers": 4})
    mlp_free = adapter.count_params({"num_layers": 4}, kept_layers=[0, 2, 4, 5])
    attention_free = adapter.count_params({"num_layers": 4}, kept_layers=[0, 1, 3, 4])
    assert attention_free - mlp_free == 2 * (2 * 48 * 80) - 2 * (2 * 48 * 48 + 2 * 48 * 16)  # 2 MLPs vs 2 attns


def test_hybrid_plan_reads_only_the_scores_that_exist():
    dims = get_adapter(tiny_ssm_model("nemotron_h")).dims()
    scores = {"ffn.1": torch.rand(80), "ffn.3": torch.rand(80), "heads.2": torch.rand(6)}
    plan = make_plan("nemotron_h", scores, dims, {"ffn_hidden_size": 40})
    assert sorted(plan.ffn) == [1, 3] and plan.heads is None
    with pytest.raises(PlanError, match=r"'heads\.<layer>'"):
        make_plan("nemotron_h", {"ffn.1": torch.rand(80)}, dims, {"num_attention_heads": 4})


# -- recipes ------------------------------------------------------------------------------------------------------

RECIPES = {  # recipe -> (family, Hub id, tiny targets)
    "nemotronh_minitron": ("nemotron_h", "nvidia/NVIDIA-Nemotron-Nano-12B-v2",
                           {"hidden_size": 40, "ffn_hidden_size": 48, "num_layers": 4, "mamba_num_heads": 8}),
    "mamba2_minitron": ("mamba2", "mistralai/Mamba-Codestral-7B-v0.1", {"hidden_size": 32, "mamba_num_heads": 8}),
}


@pytest.fixture(scope="module")
def tiny_ssm_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_ssm_models")
    return {family: save_tiny(family, root / family) for family in ("nemotron_h", "mamba2")}


def target_overrides(recipe: str, targets: dict) -> list[str]:
    published = llmprune.load_config(recipe).prune.export_config
    out = [f"prune.export_config.{k}=null" for k, v in published.items() if v is not None and k not in targets]
    return out + [f"prune.export_config.{k}={v}" for k, v in targets.items()] + ["prune.depth.num_samples=2"]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes(recipe):
    cfg = llmprune.load_config(recipe)
    assert cfg.recipe == recipe and cfg.model.path == RECIPES[recipe][1]
    assert cfg.output_dir == f"outputs/{recipe}" and cfg.distill.max_steps > 0
    assert any(v is not None for v in cfg.prune.export_config.values())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_end_to_end_on_tiny_model(recipe, tiny_ssm_dirs, tmp_path):
    family, _, targets = RECIPES[recipe]
    out = tmp_path / "run"
    report = llmprune.run(recipe, tiny_run_overrides(tiny_ssm_dirs[family], out, *target_overrides(recipe, targets)))
    for name in ("plan.json", "importance.safetensors", "report.json", "report.md", "pruned/config.json",
                 "pruned/tokenizer.json", "pruned/pruning_plan.json"):
        assert (out / name).is_file(), name
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert {k: plan.target[k] for k in targets} == targets and plan.family == family
    assert json.loads((out / "report.json").read_text())["params"] == report["params"]
    assert report["params"]["after"] == report["params"]["after_analytic"] < report["params"]["before"]
    md = (out / "report.md").read_text()
    assert "mamba_num_heads" in md and "held-out perplexity" in md, md
    if family == "nemotron_h":
        removed = report["depth"]["removed"]
        types = report["depth"]["removed_types"]
        assert len(removed) == 2 and types == [HYBRID_PATTERN[i] for i in removed]
        assert ", ".join(f"{i} ({t})" for i, t in zip(removed, types)) in md, md
    check = report["export_check"]["pruned"]
    model = AutoModelForCausalLM.from_pretrained(out / "pruned").eval()
    assert type(model).__name__ == check["reloaded_class"] and check["max_abs_logit_diff"] < 1e-4, check
    assert get_adapter(model).dims() == {**plan.original, **plan.target}
    if family == "nemotron_h":
        assert model.config.layers_block_type == [HYBRID_PATTERN[i] for i in plan.kept_layers]
    assert real_param_count(model) == report["params"]["after"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "pruned")
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(generated, greedy_without_cache(model, ids, 4)), generated  # the cache path agrees

    # distillation ran for these families too: final/ holds the distilled student, stock-loadable, same shapes
    assert report["distill"]["steps"] == 2 and math.isfinite(report["eval"]["final"]["kl_to_teacher"])
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert report["export_check"]["final"]["max_abs_logit_diff"] < 1e-4
    assert get_adapter(final).dims() == get_adapter(model).dims()
    trained = dict(final.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters()), "distillation changed nothing"


def test_bad_targets_fail_before_calibration(tiny_ssm_dirs, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PlanError, match=r"For expand=2 choose mamba_num_heads=10 or hidden_size=48"):
        llmprune.run("mamba2_minitron", tiny_run_overrides(tiny_ssm_dirs["mamba2"], out, *target_overrides(
            "mamba2_minitron", {"hidden_size": 40})))
    with pytest.raises(PlanError, match=r"mamba_num_heads=4: the llama family has no such dimension"):
        llmprune.run("smollm2_minitron", tiny_run_overrides(tiny_model_dirs["llama"], out,
                                                            "prune.export_config.mamba_num_heads=4"))
    with pytest.raises(PlanError, match=r"mamba_num_heads=7 is not a multiple of the model's Mamba n_groups=2"):
        llmprune.run("nemotronh_minitron", tiny_run_overrides(tiny_ssm_dirs["nemotron_h"], out, *target_overrides(
            "nemotronh_minitron", {"mamba_num_heads": 7})))
    assert not (out / "importance.safetensors").exists()


# published targets on the real architectures (meta device: shapes only)
NANO_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
NANO_9B_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"  # 27 M, 25 MLP, 4 attention
REAL = {
    "nemotronh_minitron": (transformers.NemotronHConfig(
        vocab_size=131072, hidden_size=5120, hybrid_override_pattern=NANO_12B_PATTERN, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, intermediate_size=20480, mamba_num_heads=128, mamba_head_dim=80,
        n_groups=8, ssm_state_size=128, conv_kernel=4, tie_word_embeddings=False), 12_310_001_152,
        8_888_227_328, "NemotronHForCausalLM"),  # NVIDIA-Nemotron-Nano-12B-v2 -> Nano-9B-v2 (8.89B)
    "mamba2_minitron": (transformers.Mamba2Config(
        vocab_size=32768, hidden_size=4096, num_hidden_layers=64, num_heads=128, head_dim=64, n_groups=8,
        state_size=128, conv_kernel=4, expand=2, tie_word_embeddings=False), 7_285_403_648,
        4_249_965_568, "Mamba2ForCausalLM"),  # Mamba-Codestral-7B-v0.1 (7.29B)
}


@pytest.mark.parametrize("recipe", sorted(REAL))
def test_published_targets_fit_the_real_architecture(recipe):
    """The 12B -> 9B targets give exactly Nemotron-Nano-9B-v2's 8.89B parameters when the removed layers leave its
    layer pattern (layers 7, 8, 23, 24, 48, 52 of the 12B are one such choice)."""
    config, before, after, architecture = REAL[recipe]
    cfg = llmprune.load_config(recipe)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    adapter = get_adapter(model)
    assert real_param_count(model) == before == adapter.count_params()
    targets = {k: v for k, v in cfg.prune.export_config.items() if v is not None}
    gen, dims = torch.Generator().manual_seed(0), adapter.dims()
    scores = {"hidden": torch.rand(dims["hidden_size"], generator=gen)}
    for i, layer in enumerate(blocks(model)):
        kind = getattr(layer, "block_type", "linear_attention")
        if kind == "linear_attention":
            scores[f"mamba_heads.{i}"] = torch.rand(dims["mamba_num_heads"], generator=gen)
            scores[f"mamba_head_dim.{i}"] = torch.rand(dims["mamba_head_dim"], generator=gen)
        elif kind == "mlp":
            scores[f"ffn.{i}"] = torch.rand(dims["ffn_hidden_size"], generator=gen)
        else:
            scores[f"heads.{i}"] = torch.rand(dims["num_attention_heads"], generator=gen)
    scores["depth.drop_one.lm_loss"] = 1 + torch.rand(dims["num_layers"], generator=gen)
    scores["depth.drop_one.lm_loss"][[7, 8, 23, 24, 48, 52][: dims["num_layers"] - targets.get("num_layers",
                                                                                               dims["num_layers"])]] = 0
    plan = plan_for(adapter, scores, targets, depth_method=cfg.prune.depth.method)
    analytic = adapter.count_params(plan.target, plan.kept_layers)
    model = adapter.apply(plan)
    assert real_param_count(model) == analytic == after, (real_param_count(model), analytic, after)
    if recipe == "nemotronh_minitron":
        assert model.config.hybrid_override_pattern == NANO_9B_PATTERN
        assert plan.depth["removed_types"] == ["full_attention", "mlp", "mlp", "linear_attention", "mlp",
                                               "full_attention"]
    to_save, written = exportable_model(model, adapter, cfg.export.architecture)
    assert to_save is model and written.startswith(architecture), written


def test_depth_pruning_that_removes_every_attention_layer_is_refused():
    """Stock transformers cannot generate with its cache from a hybrid without attention layers."""
    model = tiny_ssm_model("nemotron_h")
    adapter = get_adapter(model)
    attention = [i for i, kind in enumerate(adapter.layer_types) if kind == "full_attention"]
    scores = hand_scores(adapter)
    drop = len(attention)
    removal = torch.ones(len(adapter.layer_types))
    removal[attention] = 0  # the attention layers are the cheapest to remove
    scores["depth.drop_one.lm_loss"] = removal
    with pytest.raises(PlanError, match="removes every attention layer of this hybrid"):
        plan_for(adapter, scores, {"num_layers": len(adapter.layer_types) - drop})
    removal[attention[0]] = 2  # now the first attention layer stays
    plan = plan_for(adapter, scores, {"num_layers": len(adapter.layer_types) - drop})
    assert attention[0] in plan.kept_layers
