"""Recipe tier: every recipe composes, runs end to end on a tiny random model of its family, and its published
targets are valid for the real architecture (built on the meta device, no weights)."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math

import pytest
import torch
import transformers
from conftest import tiny_run_overrides
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune
from llmprune import ConfigError, importance
from llmprune.adapters import get_adapter
from llmprune.export.hf import exportable_model
from llmprune.plan import PruningPlan, make_plan, resolve_targets
from llmprune.stages import calibration

TINY = {"hidden_size": 48, "ffn_hidden_size": 80, "num_attention_heads": 6, "num_query_groups": 2, "num_layers": 4}
TINY_PARAMS = {"llama": 83376, "qwen3": 83440}  # the tiny_config() models; checked against the real count below

# recipe -> (family of its model, overrides that shrink its published targets to the tiny model)
RECIPES = {
    "smollm2_minitron": ("llama", {"hidden_size": 40, "ffn_hidden_size": 48}),  # 40 % 6 heads: Mistral fallback
    "smollm2_minitron_depth": ("llama", {"num_layers": 2}),
    "qwen3_minitron": ("qwen3", {"num_layers": 3}),
    "qwen3_minitron_width": ("qwen3", {"hidden_size": 40, "ffn_hidden_size": 48}),
    "llama31_minitron_4b_width": ("llama", {"hidden_size": 36, "ffn_hidden_size": 48}),
    "llama31_minitron_4b_depth": ("llama", {"num_layers": 2}),
}
STAGES = ("load", "data", "calibrate", "plan", "prune", "evaluate_pruned", "export_pruned", "distill", "export_final")


def target_overrides(recipe: str, targets: dict) -> list[str]:
    """Null every published target, then set the tiny ones (a width recipe must not keep its 4096-wide sizes)."""
    published = llmprune.load_config(recipe).prune.export_config
    out = [f"prune.export_config.{k}=null" for k, v in published.items() if v is not None and k not in targets]
    return out + [f"prune.export_config.{k}={v}" for k, v in targets.items()] + ["prune.depth.num_samples=2"]


def hidden_files(root) -> list[str]:
    """Leftover temporaries of atomic writes (.name.tmp, .pruned.tmp-*, .pruned.old-*)."""
    return sorted(str(p) for p in root.rglob(".*"))


# recipe -> (test module, test function) of the recipes whose tiny end-to-end run lives elsewhere
END_TO_END_ELSEWHERE = {
    "mamba2_minitron": ("test_hybrid", "test_recipe_runs_end_to_end_on_tiny_model"),
    "nemotronh_minitron": ("test_hybrid", "test_recipe_runs_end_to_end_on_tiny_model"),
    "bert_gradnas": ("test_gradnas_pipeline", "test_bert_gradnas_recipe_on_real_minilm"),
    "gptj_gradnas": ("test_gradnas_pipeline", "test_gptj_gradnas_on_tiny_model"),
    "smollm2_minitron_search": ("test_search", "test_search_recipe_runs_end_to_end_and_resumes"),
    "qwen3_minitron_search": ("test_recipes", "test_qwen3_search_recipe_runs_end_to_end_on_tiny_model"),
}


def runs_recipe(test, recipe: str) -> bool:
    """Whether the test function calls llmprune.run on `recipe` itself or is parametrized over it."""
    params = [m.args[1] for m in getattr(test, "pytestmark", []) if m.name == "parametrize" and m.args[0] == "recipe"]
    return f'llmprune.run("{recipe}"' in inspect.getsource(test) or any(recipe in p for p in params)


def test_every_shipped_recipe_has_an_end_to_end_test():
    """Both ways: a recipe added to recipes/ without a tiny end-to-end run fails here, and so does a listed one that
    is no longer shipped or whose test does not run it."""
    shipped, covered = set(llmprune.list_recipes()), set(RECIPES) | set(END_TO_END_ELSEWHERE)
    assert shipped == covered, (f"recipes without an end-to-end test: {sorted(shipped - covered)}; "
                                f"listed but not shipped: {sorted(covered - shipped)}")
    for recipe, (module, name) in END_TO_END_ELSEWHERE.items():
        test = getattr(importlib.import_module(module), name, None)
        assert test is not None, f"{module}.{name} (the end-to-end test of {recipe}) does not exist"
        assert runs_recipe(test, recipe), f"{module}.{name} does not run {recipe}"
        assert not any(m.name in ("skip", "gpu") for m in getattr(test, "pytestmark", [])), (recipe, name)
    assert runs_recipe(test_recipe_runs_end_to_end_on_tiny_model, "smollm2_minitron")


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no KV cache, no generate()): argmax of the last position, appended."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes(recipe):
    cfg = llmprune.load_config(recipe)
    assert cfg.recipe == recipe
    assert cfg.output_dir == f"outputs/{recipe}"  # base.yaml's interpolation resolved with the recipe name
    assert cfg.distill.max_steps > 0, "every recipe distills the pruned student"
    assert any(v is not None for v in cfg.prune.export_config.values()), "a recipe must set a target"
    expected_model = {"smollm2": "embedded:smollm2", "qwen3": "Qwen/Qwen3-8B", "llama31": "meta-llama/Llama-3.1-8B"}
    assert cfg.model.path == expected_model[recipe.split("_minitron")[0]]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_end_to_end_on_tiny_model(recipe, tiny_model_dirs, tmp_path):
    family, targets = RECIPES[recipe]
    out = tmp_path / "run"
    report = llmprune.run(recipe, tiny_run_overrides(tiny_model_dirs[family], out, *target_overrides(recipe, targets)))
    expected = {**TINY, **targets}

    # run directory artifacts
    for name in ("config.yaml", "plan.json", "importance.safetensors", "report.json", "report.md"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    pruned = out / "pruned"
    for name in ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                 "pruning_plan.json"):
        assert (pruned / name).is_file(), f"pruned/{name} missing: {sorted(p.name for p in pruned.iterdir())}"
    assert list(pruned.glob("*.safetensors")), sorted(p.name for p in pruned.iterdir())
    assert hidden_files(out) == []

    # plan.json and importance.safetensors
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert {k: plan.target[k] for k in TINY} == expected
    assert len(plan.kept_layers) == expected["num_layers"]
    if expected["hidden_size"] < TINY["hidden_size"]:
        assert len(plan.hidden) == expected["hidden_size"]
    scores = load_file(str(out / "importance.safetensors"))
    assert {"hidden", "ffn.0", "heads.0", "block_importance"} <= set(scores), sorted(scores)
    assert scores["hidden"].shape == (TINY["hidden_size"],)
    with safe_open(str(out / "importance.safetensors"), "pt") as f:
        assert len(f.metadata()["fingerprint"]) == 16
    if expected["num_layers"] < TINY["num_layers"]:
        removed = report["removed_layers"]
        assert len(removed) == TINY["num_layers"] - expected["num_layers"]
        assert sorted(set(removed) | set(plan.kept_layers)) == list(range(TINY["num_layers"]))
        if llmprune.load_config(recipe).prune.depth.method == "contiguous":
            assert removed == list(range(removed[0], removed[0] + len(removed))), removed

    # report.json / report.md
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["params"] == report["params"]
    assert report["params"]["before"] == TINY_PARAMS[family]
    assert report["params"]["after"] < report["params"]["before"]
    for who in ("teacher", "pruned"):
        assert math.isfinite(report["eval"][who]["perplexity"]) and report["eval"][who]["perplexity"] > 1
    kl = report["eval"]["pruned"]["kl_to_teacher"]
    assert math.isfinite(kl) and kl > 0, kl
    assert list(report["timings_s"]) == list(STAGES), report["timings_s"]
    assert all(v >= 0 for v in report["timings_s"].values())
    md = (out / "report.md").read_text()
    for needle in ("parameters", "held-out perplexity", "KL to original", *STAGES,
                   f"{report['eval']['teacher']['perplexity']:,.2f}", f"{report['eval']['pruned']['perplexity']:,.2f}",
                   report["architecture_written"]):
        assert needle in md, f"{needle!r} not in report.md:\n{md}"
    card = (pruned / "README.md").read_text()
    assert "library_name: transformers" in card and f"`{recipe}`" in card, card
    final = out / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors")), sorted(out.iterdir())
    assert math.isfinite(report["eval"]["final"]["perplexity"]) and report["distill"]["steps"] == 2
    assert report["export_check"]["final"]["max_abs_logit_diff"] < 1e-4, report["export_check"]

    # stock transformers reloads the pruned shapes and generates
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        expected["hidden_size"], expected["ffn_hidden_size"], expected["num_attention_heads"],
        expected["num_query_groups"], expected["num_layers"])
    layer = model.model.layers[0]
    assert model.model.embed_tokens.weight.shape == (128, expected["hidden_size"])
    assert layer.mlp.gate_proj.weight.shape == (expected["ffn_hidden_size"], expected["hidden_size"])
    assert layer.self_attn.k_proj.weight.shape == (expected["num_query_groups"] * 8, expected["hidden_size"])
    assert len(model.model.layers) == expected["num_layers"]
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
    assert report["export_check"]["pruned"]["max_abs_logit_diff"] < 1e-4, report["export_check"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(generated, greedy_without_cache(model, ids, 4)), generated  # the KV-cache path agrees


@pytest.fixture
def calls(monkeypatch):
    """Counts calibration passes (activation scores) and depth-removal passes (with their arguments)."""
    seen = {"activation": 0, "removal": []}
    activation, removal = importance.activation_scores, calibration.removal_scores

    def counted_activation(*args, **kwargs):
        seen["activation"] += 1
        return activation(*args, **kwargs)

    def counted_removal(*args, **kwargs):
        seen["removal"].append({k: kwargs.get(k) for k in ("drop_one", "block_sizes")})
        return removal(*args, **kwargs)

    monkeypatch.setattr(importance, "activation_scores", counted_activation)
    monkeypatch.setattr(calibration, "removal_scores", counted_removal)
    return seen


def fingerprint(run_dir) -> str:
    with safe_open(str(run_dir / "importance.safetensors"), "pt") as f:
        return f.metadata()["fingerprint"]


def test_retarget_reuses_importance_and_data_change_recomputes(tiny_model_dirs, tmp_path, calls, llmprune_log):
    out = tmp_path / "run"
    base = tiny_run_overrides(tiny_model_dirs["llama"], out, "prune.export_config.ffn_hidden_size=null")
    llmprune.run("smollm2_minitron", [*base, "prune.export_config.hidden_size=40"])
    first, first_scores = fingerprint(out), load_file(str(out / "importance.safetensors"))
    assert calls["activation"] == 1
    assert not any("reusing" in line for line in llmprune_log)

    report = llmprune.run("smollm2_minitron", [*base, "prune.export_config.hidden_size=36"])
    assert calls["activation"] == 1, "re-targeting must not re-run calibration"
    assert any(line.startswith("importance: reusing") for line in llmprune_log), llmprune_log
    assert fingerprint(out) == first
    again = load_file(str(out / "importance.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in first_scores.items())
    assert report["target"]["hidden_size"] == 36
    assert len(PruningPlan.from_json((out / "plan.json").read_text()).hidden) == 36

    llmprune.run("smollm2_minitron", [*base, "prune.export_config.hidden_size=36", "data.seq_len=24"])
    assert calls["activation"] == 2, "changed data settings must re-run calibration"
    assert fingerprint(out) != first


def test_changed_text_under_the_same_config_recomputes_the_scores(tiny_model_dirs, tmp_path, calls):
    """A data file edited in place (or any text change the config cannot show) must not reuse stale scores."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a text about pruning language models.\n" for i in range(400)))
    base = tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "run", "data.source=files",
                              f"data.paths=[{corpus}]", "prune.export_config.hidden_size=40",
                              "prune.export_config.ffn_hidden_size=null", "distill.max_steps=0")
    llmprune.run("smollm2_minitron", base)
    llmprune.run("smollm2_minitron", base)
    assert calls["activation"] == 1, "the same text must reuse the scores"
    corpus.write_text("".join(f"row {i}: other words entirely, a different corpus.\n" for i in range(400)))
    llmprune.run("smollm2_minitron", base)
    assert calls["activation"] == 2, "changed text under the same config must re-run calibration"


def test_depth_retarget_computes_only_the_missing_block_scores(tiny_model_dirs, tmp_path, calls):
    out = tmp_path / "run"
    base = tiny_run_overrides(tiny_model_dirs["llama"], out, "prune.depth.num_samples=2")
    llmprune.run("llama31_minitron_4b_depth", [*base, "prune.export_config.num_layers=2"])
    assert calls == {"activation": 1, "removal": [{"drop_one": False, "block_sizes": (2,)}]}
    report = llmprune.run("llama31_minitron_4b_depth", [*base, "prune.export_config.num_layers=3"])
    assert calls["activation"] == 1
    assert calls["removal"][1] == {"drop_one": False, "block_sizes": (1,)}
    assert {"depth.contiguous.lm_loss.n2", "depth.contiguous.lm_loss.n1"} <= set(
        load_file(str(out / "importance.safetensors")))
    assert len(report["removed_layers"]) == 1


# -- published targets on the real architectures (meta device: shapes only, no memory) --------------------------
REAL = {
    "smollm2": transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        tie_word_embeddings=True),
    "qwen3": transformers.Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                      tie_word_embeddings=False),
    "llama31": transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                        tie_word_embeddings=False),
}
REAL_PARAMS = {"smollm2": 134_515_008, "qwen3": 8_190_735_360, "llama31": 8_030_261_248}
# recipe -> (published size, relative tolerance, architecture class written)
PUBLISHED = {
    "smollm2_minitron": (83_978_944, 0.0, "MistralForCausalLM"),  # 448 % 9 heads: the stock fallback
    "smollm2_minitron_depth": (134_515_008 - 10 * 3_540_096, 0.0, "LlamaForCausalLM"),  # 10 layers of 3.54M
    "qwen3_minitron": (6.0e9, 0.05, "Qwen3ForCausalLM"),  # recipe: ~6B
    "qwen3_minitron_width": (6.0e9, 0.05, "Qwen3ForCausalLM"),
    "llama31_minitron_4b_width": (4.5e9, 0.03, "LlamaForCausalLM"),  # Llama-3.1-Minitron-4B-Width: 4.5B
    "llama31_minitron_4b_depth": (4.5e9, 0.03, "LlamaForCausalLM"),  # Llama-3.1-Minitron-4B-Depth: 4.5B
}


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_published_targets_fit_real_architecture(recipe):
    """resolve_targets accepts the recipe; slicing a meta model to a (random-score) plan gives the published size."""
    cfg = llmprune.load_config(recipe)
    base = recipe.split("_minitron")[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(REAL[base]))  # apply() rewrites the config
    adapter = get_adapter(model)
    assert n_params(model) == REAL_PARAMS[base] == adapter.count_params()
    targets = {k: v for k, v in cfg.prune.export_config.items() if v is not None}
    target = resolve_targets(adapter.dims(), targets)
    analytic = adapter.count_params(target)
    published, tolerance, architecture = PUBLISHED[recipe]
    print(f"\n{recipe}: {n_params(model):,} -> {analytic:,} parameters (published {published:,.0f}); {target}")
    assert abs(analytic / published - 1) <= tolerance, (analytic, published)

    # a plan from random scores, applied on the meta device: real tensor sizes must agree with the analytic count
    dims, g = adapter.dims(), torch.Generator().manual_seed(0)
    scores = {"hidden": torch.rand(dims["hidden_size"], generator=g)}
    for i in range(dims["num_layers"]):
        scores[f"ffn.{i}"] = torch.rand(dims["ffn_hidden_size"], generator=g)
        scores[f"heads.{i}"] = torch.rand(dims["num_attention_heads"], generator=g)
    drop = dims["num_layers"] - target["num_layers"]
    scores[f"depth.{cfg.prune.depth.method}.{cfg.prune.depth.metric}"] = torch.rand(dims["num_layers"], generator=g)
    scores[f"depth.contiguous.{cfg.prune.depth.metric}.n{drop}"] = torch.rand(dims["num_layers"] - drop + 1,
                                                                              generator=g)
    plan = make_plan(adapter.family, scores, dims, targets, cfg.prune.depth.method, cfg.prune.depth.metric)
    model = adapter.apply(plan)
    assert n_params(model) == analytic
    to_save, written = exportable_model(model, adapter, cfg.export.architecture)
    assert written.startswith(architecture), written
    assert n_params(to_save) == analytic


@pytest.mark.slow
def test_recipe_data_fits_the_embedded_text(smollm2_loaded):
    """Each recipe's calibration fits the embedded text, which it names or falls back to offline (the 8B recipes'
    corpus). The 8B models' tokenizers are not available offline, so SmolLM2's (49K vocabulary) stands in with a 25%
    margin: bigger vocabularies need fewer tokens for the same text."""
    from llmprune.data import embedded_documents, split_stream, token_stream

    stream = token_stream(embedded_documents(), smollm2_loaded[1])
    for recipe in sorted(RECIPES):
        data = llmprune.load_config(recipe).data
        assert data.source == "embedded" or data.fallback == "embedded", recipe
        margin = 1.0 if recipe.startswith("smollm2") else 0.75  # the SmolLM2 recipes use exactly this tokenizer
        shorter = stream[: int(len(stream) * margin)]
        if data.source != "embedded":  # sized for its corpus; the fallback calibrates on what the text holds
            data.num_samples = min(data.num_samples, int(len(shorter) * (1 - data.eval_fraction)) // data.seq_len)
            assert data.num_samples >= 32, (recipe, data.num_samples)
        splits = split_stream(shorter, data.seq_len, data.num_samples, data.eval_samples, data.eval_fraction)
        print(f"\n{recipe}: {len(stream):,} tokens; {data.num_samples} x {data.seq_len} calibration, "
              f"{len(splits.heldout)} held-out samples")
        assert len(splits.calib) == data.num_samples


def test_drop_layers_removes_the_named_layers_without_a_depth_search(tiny_model_dirs, tmp_path, calls):
    out = tmp_path / "run"
    report = llmprune.run("smollm2_minitron_depth", tiny_run_overrides(
        tiny_model_dirs["llama"], out, "prune.export_config.num_layers=null", "prune.depth.drop_layers=[0,2]",
        "distill.max_steps=0"))
    assert calls["removal"] == [], "named layers need no depth scores"
    assert report["removed_layers"] == [0, 2] and report["target"]["num_layers"] == 2
    assert PruningPlan.from_json((out / "plan.json").read_text()).kept_layers == [1, 3]
    with pytest.raises(ConfigError, match=r"export_config.num_layers=3 but prune.depth.drop_layers removes 2"):
        llmprune.run("smollm2_minitron_depth", tiny_run_overrides(
            tiny_model_dirs["llama"], tmp_path / "bad", "prune.export_config.num_layers=3",
            "prune.depth.drop_layers=[0,2]"))


# -- search recipes: a budget (prune.constraints) instead of targets ------------------------------------------------
# recipe -> (model, budget); smollm2_minitron_search's tiny end-to-end run and resume are in test_search.py
SEARCH_RECIPES = {"smollm2_minitron_search": ("embedded:smollm2", {"params": "84.0M"}),
                  "qwen3_minitron_search": ("Qwen/Qwen3-8B", {"params": "6.0B"})}


@pytest.mark.parametrize("recipe", sorted(SEARCH_RECIPES))
def test_search_recipe_composes_and_its_budget_fits_the_real_architecture(recipe):
    """The recipe composes with its published budget and no targets; on the real architecture (meta device) the
    budget is satisfiable, and the candidates using most of it are within it and cost what their pruned models count."""
    from llmprune.search.space import SearchSpace, search_choices

    cfg = llmprune.load_config(recipe)
    model_path, budget = SEARCH_RECIPES[recipe]
    assert cfg.recipe == recipe and cfg.model.path == model_path and cfg.distill.max_steps > 0
    assert {k: v for k, v in cfg.prune.constraints.items() if v is not None} == budget
    assert all(v is None for v in cfg.prune.export_config.values()), "the search chooses the targets"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(REAL[recipe.split("_minitron")[0]]))
    adapter = get_adapter(model)
    dims = adapter.dims()
    choices = search_choices(dims, dict(cfg.search.divisors), dict(cfg.search.lowest_fraction))
    space = SearchSpace(adapter.cost_model(), dims, choices, cfg.data.seq_len)
    profile = space.profile(dict(cfg.prune.constraints))
    profile.check()
    top = space.candidates(profile.bounds)[: cfg.search.top_k]
    assert len(top) == cfg.search.top_k and all(c.costs["params"] <= profile.bounds["params"] for c in top)
    assert top[0].costs["params"] > 0.99 * profile.bounds["params"], "the largest candidates under the budget first"
    assert adapter.count_params({**dims, **top[0].target}) == top[0].costs["params"]


def test_qwen3_search_recipe_runs_end_to_end_on_tiny_model(tiny_model_dirs, tmp_path):
    """qwen3_minitron_search on a tiny random Qwen3: its 6B budget becomes 85% of the tiny model, the grid stays the
    recipe's (automatic divisors), fewer candidates; the pick is exported as a stock Qwen3 that transformers loads."""
    out = tmp_path / "run"
    report = llmprune.run("qwen3_minitron_search", tiny_run_overrides(
        tiny_model_dirs["qwen3"], out, "prune.constraints.params=85%", "prune.depth.num_samples=2", "search.top_k=3",
        "search.finalists=1", "search.distill_tokens=64"))
    search = report["search"]
    assert report["params"]["after"] <= search["bounds"]["params"] < report["params"]["before"] == TINY_PARAMS["qwen3"]
    assert len(search["scored"]) == 3 and search["pick"] in search["finalists"]
    assert report["architecture_written"].startswith("Qwen3ForCausalLM")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert n_params(final) == report["params"]["after"] and final.config.hidden_size == search["target"]["hidden_size"]
