"""Megatron backend tier (backend=megatron): llama-like HF models as megatron-core GPTModels, on the CPU.

megatron-core's local layers run here through the test-only shim tests/megatron_cpu.py (its CUDA-only device and
RNG-tracker calls redirected to the CPU); tensor and pipeline parallelism run under torchrun with gloo. Conversion both
ways is exact; logits, scores and exported weights match the HF backend's; TP=2 and PP=2 match one process (and
tests/megatron_pipeline_check.py checks PP=2 against the HF backend: tied embeddings, all depth scores, an emptied
last stage); a recipe runs end to end with backend=megatron; bad configurations fail before any work.
tests/test_megatron_gpu.py runs the same on CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import save_tiny, tiny_batch, tiny_config, tiny_model, tiny_run_overrides
from helpers import assert_close
from megatron_cpu import megatron_on_cpu
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmprune
from llmprune import ConfigError, PruningPlan
from llmprune.adapters import get_adapter
from llmprune.backends.megatron import convert, parallel
from llmprune.backends.megatron.adapter import MegatronGPTAdapter
from llmprune.data import to_batches
from llmprune.distributed import Stages
from llmprune.importance.activation import activation_scores
from llmprune.importance.depth import removal_scores
from llmprune.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
CASES = [("llama", False), ("mistral", False), ("qwen2", False), ("qwen3", False), ("llama", True), ("qwen3", True)]
IDS = [f"{f}-{'tied' if tied else 'untied'}" for f, tied in CASES]
# hidden 48 -> 40, FFN 80 -> 48, 6 heads in 2 groups -> 2 heads in 1 group, 4 -> 3 layers
# megatron-core warns at import that Apex / TransformerEngine are missing: expected on the CPU
pytestmark = pytest.mark.filterwarnings("ignore:.*(Apex|Transformer Engine|full scope).*:UserWarning")
TARGETS = {"hidden_size": 40, "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1,
           "num_layers": 3}


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu(one_torch_thread):
    """megatron-core on the CPU for this module."""
    with megatron_on_cpu():
        yield


@pytest.fixture(autouse=True)
def no_process_group_left():
    """Each test starts without megatron's groups or a default process group (from_hf makes a one-process group),
    and leaves none to the next test or module."""
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def converted(family: str, tied: bool = False, **overrides):
    hf = tiny_model(family, tie_word_embeddings=tied, **overrides)
    return hf, MegatronGPTAdapter.from_hf(hf)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = tiny_batch(4)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding: it must not enter any score
    return ids, mask


# -- layouts --------------------------------------------------------------------------------------------------------
def test_fused_qkv_and_gated_fc1_shards_follow_megatron_layout():
    """TP=2 shards of a llama layer (6 heads in 2 groups, head_dim 8, FFN 80), built from labelled rows."""
    c = tiny_config("llama", vocab_size=127)
    q, k, v = (torch.arange(n * 8, dtype=torch.float32)[:, None] + base for n, base in ((6, 0), (2, 1000), (2, 2000)))
    for rank in (0, 1):  # rank r holds query group r: [its 3 query heads; k_r; v_r]
        expected = torch.cat([q[24 * rank: 24 * rank + 24], k[8 * rank: 8 * rank + 8], v[8 * rank: 8 * rank + 8]])
        assert torch.equal(convert.to_shard("qkv", [q, k, v], c, 2, rank), expected)
    gate, up = torch.arange(80.0)[:, None], torch.arange(80.0)[:, None] + 1000
    for rank in (0, 1):  # rank r holds [gate rows of r; up rows of r], so chunk(2) of its output is (gate, up)
        expected = torch.cat([gate[40 * rank: 40 * rank + 40], up[40 * rank: 40 * rank + 40]])
        assert torch.equal(convert.to_shard("gated", [gate, up], c, 2, rank), expected)

    g = torch.Generator().manual_seed(0)
    full = {"replicated": [torch.randn(48, generator=g)], "columns": [torch.randn(48, 80, generator=g)],
            "gated": [torch.randn(80, 48, generator=g), torch.randn(80, 48, generator=g)],
            "qkv": [torch.randn(n, 48, generator=g) for n in (48, 16, 16)],
            "vocab": [torch.randn(127, 48, generator=g)]}  # 127 rows: padded to 128 for two ranks
    for layout, tensors in full.items():
        shards = [convert.to_shard(layout, tensors, c, 2, r) for r in (0, 1)]
        assert shards[0].shape == shards[1].shape, layout
        back = convert.from_shards(layout, shards, c)
        assert all(torch.equal(a, b) for a, b in zip(back, tensors)), layout


# -- conversion -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "tied"), CASES, ids=IDS)
def test_round_trip_is_exact_and_logits_match_hf(family, tied):
    hf, adapter = converted(family, tied)
    assert adapter.model.share_embeddings_and_output_weights == tied
    back = adapter.to_hf(hf)
    expected, got = hf.state_dict(), back.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected
                                                                     if not torch.equal(got[k], expected[k])]
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert adapter.count_params() == sum(p.numel() for p in adapter.model.parameters()) == \
        sum(p.numel() for p in get_adapter(hf).model.parameters())

    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(adapter.lm_logits(ids), hf(input_ids=ids).logits)
        real = mask.bool()  # padded positions predict nothing; compare the real ones
        assert_close(adapter.lm_logits(ids, mask)[real], hf(input_ids=ids, attention_mask=mask).logits[real])


def test_rope_theta_and_llama31_scaling_are_converted():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf, adapter = converted("llama", rope_parameters=rope)
    assert adapter.model.rotary_pos_emb.inv_freq.shape == (4,)
    ids = tiny_batch()
    with torch.no_grad():
        assert_close(adapter.lm_logits(ids), hf(input_ids=ids).logits)


# -- importance -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_scores_equal_the_hf_backends(family):
    """Same model and data (one padded row): the same Minitron scores, Block Importance and drop-one / contiguous
    removal losses as the HF adapter (float32 rounding apart)."""
    hf, adapter = converted(family)
    ids, mask = padded_batch()
    hf_scores = activation_scores(hf, get_adapter(hf), to_batches(ids, 2, mask))
    scores = activation_scores(adapter.model, adapter, to_batches(ids, 2, mask))
    names = {k.replace("pre_mlp_layernorm", "post_attention_layernorm"): k for k in scores}
    assert set(names) == set(hf_scores), sorted(set(names) ^ set(hf_scores))
    for hf_name, name in names.items():
        expected = hf_scores[hf_name]
        rel = ((scores[name] - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-5, f"{name}: relative difference {rel:.3g}"

    depth_hf = removal_scores(hf, get_adapter(hf), to_batches(ids, 2, mask), drop_one=True, block_sizes=(2,))
    depth = removal_scores(adapter.model, adapter, to_batches(ids, 2, mask), drop_one=True, block_sizes=(2,))
    assert depth.keys() == depth_hf.keys()
    for name in depth:
        assert_close(depth[name], depth_hf[name])


# -- pruning and export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "tied"), CASES, ids=IDS)
def test_same_plan_exports_identical_weights(family, tied):
    """A plan from real scores (hidden, FFN, heads, query groups, a layer; norms rescaled) applied by both
    backends: the megatron export holds exactly the HF backend's tensors."""
    hf, adapter = converted(family, tied)
    hf_adapter = get_adapter(hf)
    scores = activation_scores(hf, hf_adapter, to_batches(tiny_batch(4), 2))
    plan = make_plan(hf_adapter.family, scores, hf_adapter.dims(), TARGETS, "block_importance", rescale_norms=True)
    assert plan.hidden and plan.ffn and plan.heads and len(plan.kept_layers) == 3

    student = copy.deepcopy(hf)
    student = get_adapter(student).apply(plan)
    adapter.apply(plan)
    exported = adapter.to_hf(hf)
    expected, got = student.state_dict(), exported.state_dict()
    assert got.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ
    config, expected_config = (m.config.to_dict() for m in (exported, student))
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in expected_config.items()
                                                                 if k != "dtype"}

    assert [layer.layer_number for layer in adapter.layers] == [1, 2, 3]  # renumbered after the removal
    assert adapter.dims() == get_adapter(student).dims()
    megatron_params = sum(p.numel() for p in adapter.model.parameters())
    assert adapter.count_params() == megatron_params == sum(p.numel() for p in student.parameters())
    ids = tiny_batch()
    with torch.no_grad():
        assert_close(adapter.lm_logits(ids), student(input_ids=ids).logits)


def test_empty_plan_keeps_the_model():
    hf, adapter = converted("qwen3")
    dims = get_adapter(hf).dims()
    plan = make_plan("megatron_gpt", {}, dims, {}, "block_importance")
    model = adapter.model
    adapter.apply(plan)
    assert adapter.model is model


# -- recipe-level runs ----------------------------------------------------------------------------------------------
TINY_TARGETS = ("prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
                "prune.export_config.num_attention_heads=4", "prune.export_config.num_layers=3",
                "prune.depth.num_samples=2")  # drop-one (the recipe's depth method) on the megatron model too
RECIPE = "smollm2_minitron"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """The same recipe and targets on the tiny llama: backend=hf, and backend=megatron with 2 distillation steps."""
    root = tmp_path_factory.mktemp("megatron_runs")
    model_dir = tiny_model_dirs["llama"]
    out = {}
    for name, extra in (("hf", ("distill.max_steps=0",)), ("megatron", ("backend=megatron",))):
        out[name] = SimpleNamespace(dir=root / name, report=llmprune.run(
            RECIPE, tiny_run_overrides(model_dir, root / name, *TINY_TARGETS, *extra)))
    return SimpleNamespace(model_dir=model_dir, **out)


def test_recipe_runs_end_to_end_with_backend_megatron(runs):
    report, out = runs.megatron.report, runs.megatron.dir
    assert report["backend"] == "megatron"
    assert list(report["timings_s"]) == ["load", "data", "convert", "calibrate", "plan", "prune", "evaluate_pruned",
                                         "export_pruned", "distill", "export_final"]
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert plan.family == "megatron_gpt" and plan.depth["method"] == "drop_one" and len(plan.kept_layers) == 3
    assert report["params"]["after"] == report["params"]["after_analytic"] < report["params"]["before"]
    for stage in ("pruned", "final"):
        assert report["export_check"][stage]["max_abs_logit_diff"] < 1e-4, report["export_check"]
    assert report["distill"]["steps"] == 2  # distillation runs on the exported HF student

    # stock transformers reloads pruned/ with the pruned shape; it holds exactly what backend=hf writes
    model = AutoModelForCausalLM.from_pretrained(out / "pruned")
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        40, 48, 4, 2, 3)
    scores, hf_scores = (load_file(str(d / "importance.safetensors")) for d in (out, runs.hf.dir))
    for name, value in scores.items():  # the same Minitron scores as backend=hf
        expected = hf_scores[name.replace("pre_mlp_layernorm", "post_attention_layernorm")]
        scale = 1.0 if name.startswith("depth.") else expected.abs().max().item()
        assert (value - expected).abs().max().item() / scale <= 1e-5, name
    hf_plan = PruningPlan.from_json((runs.hf.dir / "plan.json").read_text())
    assert (plan.kept_layers, plan.hidden, plan.ffn, plan.heads) == (hf_plan.kept_layers, hf_plan.hidden,
                                                                      hf_plan.ffn, hf_plan.heads)
    ours, theirs = weights(out / "pruned"), weights(runs.hf.dir / "pruned")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not dist.is_initialized(), "the run must release the process group it made"


def launch(script: str, nproc: int, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`script` (in tests/) on `nproc` CPU processes under torchrun (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "tests" / script), *args]
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_run(out: Path, reference: Path, what: str) -> None:
    """The run in `out` has the scores (float tolerance), plan and exported weights (bitwise) of `reference`."""
    one, two = (load_file(str(d / "importance.safetensors")) for d in (reference, out))
    assert one.keys() == two.keys(), sorted(set(one) ^ set(two))
    for name in one:  # drop-one values are differences of losses: compare them absolutely
        scale = 1.0 if name.startswith("depth.") else one[name].abs().max().item()
        diff = (two[name] - one[name]).abs().max().item() / scale
        assert diff <= 1e-5, f"{name}: {what} differs from one process by {diff:.3g}"
    plan_1, plan_2 = (PruningPlan.from_json((d / "plan.json").read_text()) for d in (reference, out))
    assert (plan_2.kept_layers, plan_2.hidden, plan_2.ffn, plan_2.heads, plan_2.groups) == (
        plan_1.kept_layers, plan_1.hidden, plan_1.ffn, plan_1.heads, plan_1.groups)
    w1, w2 = weights(reference / "pruned"), weights(out / "pruned")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    report = json.loads((out / "report.json").read_text())
    assert report["export_check"]["pruned"]["max_abs_logit_diff"] < 1e-4


def test_torchrun_tensor_parallel_2_matches_tp_1(runs, tmp_path):
    """2 CPU processes (gloo), one model split in two: the same scores, plan and exported weights as TP=1."""
    out = tmp_path / "tp2"
    result = launch("megatron_launch.py", 2, tmp_path, f"recipe={RECIPE}",
                    *tiny_run_overrides(runs.model_dir, out, *TINY_TARGETS, "backend=megatron",
                                        "megatron.tensor_parallel_size=2", "distill.max_steps=0"))
    assert_same_run(out, runs.megatron.dir, "TP=2")
    logs = result.stderr.replace("\r", "\n")
    assert logs.count("[llmprune] stage: convert") == 1, logs[-3000:]  # rank 0 logs


def test_torchrun_pipeline_parallel_2_matches_pp_1(runs, tmp_path):
    """2 CPU processes, one model in two pipeline stages of 2 layers (drop-one depth scoring runs across them; the
    pruned model keeps 3): the same scores, plan and exported weights as one process."""
    out = tmp_path / "pp2"
    launch("megatron_launch.py", 2, tmp_path, f"recipe={RECIPE}",
           *tiny_run_overrides(runs.model_dir, out, *TINY_TARGETS, "backend=megatron",
                               "megatron.pipeline_parallel_size=2", "distill.max_steps=0"))
    assert_same_run(out, runs.megatron.dir, "PP=2")


def test_torchrun_pipeline_parallel_2_matches_the_hf_backend(tmp_path):
    """tests/megatron_pipeline_check.py on 2 processes: tied and untied models, every score, drop-one and contiguous
    removal for lm_loss and KL, and exports bitwise the HF backend's, also for a plan that empties the last stage.
    By hand, TP=2 x PP=2: torchrun --nproc_per_node=4 tests/megatron_pipeline_check.py --pp 2 --tp 2."""
    result = launch("megatron_pipeline_check.py", 2, tmp_path, "--pp", "2")
    assert result.stdout.count(": ok TP=1 PP=2") == 2, result.stdout[-3000:]


def test_pipeline_stages_split_layers_evenly_and_find_their_layers():
    assert parallel.stage_sizes(8, 2) == [4, 4] and parallel.stage_sizes(10, 4) == [3, 3, 2, 2]
    stages = Stages(starts=(0, 2, 2, 3), stage=1, ranks=(0, 1, 2))  # stage 1 kept no layers after pruning
    assert [stages.stage_of(i) for i in range(3)] == [0, 0, 2] and list(stages.layer_ids) == []
    assert (stages.count, stages.num_layers, stages.first, stages.last) == (3, 3, False, False)
    assert convert.pipeline_layout([2, 0, 1]) == [["embedding", "decoder", "decoder"], [], ["decoder", "loss"]]
    assert convert.pipeline_layout([4]) is None


# -- bad configurations ---------------------------------------------------------------------------------------------
def test_config_rejects_megatron_for_other_families_and_settings(tiny_model_dirs, tmp_path):
    mamba_dir = save_tiny("mamba2", tmp_path / "mamba2")
    with pytest.raises(ConfigError) as err:
        llmprune.load_config("mamba2_minitron", ["backend=megatron", f"model.path={mamba_dir}",
                                                 "prune.importance=magnitude", "megatron.pipeline_parallel_size=0",
                                                 "megatron.tensor_parallel_size=0"])
    message = str(err.value)
    for needle in ("'mamba2' model. Use backend=hf", "prune.export_config.mamba_num_heads is a Mamba target",
                   "prune.importance=magnitude needs backend=hf",
                   "megatron.pipeline_parallel_size=0 must be at least 1",
                   "megatron.tensor_parallel_size=0 must be at least 1"):
        assert needle in message, message
    with pytest.raises(ConfigError, match="megatron.pipeline_parallel_size=8 exceeds the model's 4 layers"):
        llmprune.load_config(RECIPE, ["backend=megatron", f"model.path={tiny_model_dirs['llama']}",
                                      "megatron.pipeline_parallel_size=8"])
    with pytest.raises(ConfigError, match="megatron.transformer_impl='fast' is not one of: local, transformer_engine"):
        llmprune.load_config(RECIPE, ["backend=megatron", "megatron.transformer_impl=fast"])
    assert "megatron" in llmprune.load_config(RECIPE, ["backend=megatron"]).backend


def test_uneven_tensor_parallel_targets_fail_before_calibration(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], out, "backend=megatron", "megatron.tensor_parallel_size=2",
                                   "prune.export_config.hidden_size=null", "prune.export_config.ffn_hidden_size=45")
    with pytest.raises(ConfigError, match=r"prune.export_config.ffn_hidden_size=45 is not a multiple of "
                                          r"megatron.tensor_parallel_size=2"):
        llmprune.run(RECIPE, overrides)
    assert not (out / "importance.safetensors").exists()


def test_unconvertible_models_and_settings_are_named():
    with pytest.raises(ConfigError) as err:
        convert.check_convertible(tiny_config("llama", attention_bias=True, mlp_bias=True, hidden_act="gelu"), 4)
    for needle in ("attention_bias=True", "mlp_bias=True", "hidden_act='gelu'",
                   "num_key_value_heads=2 is not a multiple of megatron.tensor_parallel_size=4"):
        assert needle in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="num_hidden_layers=4 is smaller than megatron.pipeline_parallel_size=8"):
        convert.check_convertible(tiny_config("llama"), 1, pp=8)
    with pytest.raises(ConfigError, match="sliding_window=4096"):
        convert.check_convertible(tiny_config("mistral", sliding_window=4096), 1)
    with pytest.raises(ConfigError, match="RoPE scaling .*'rope_type': 'yarn'"):
        convert.check_convertible(tiny_config("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                        "rope_theta": 1e4}), 1)
    hf = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"must divide the number of processes \(1\)"):
        MegatronGPTAdapter.from_hf(hf, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine needs TransformerEngine and a CUDA GPU"):
        MegatronGPTAdapter.from_hf(hf, transformer_impl="transformer_engine")


def test_without_cuda_the_package_refuses_backend_megatron(monkeypatch):
    """Outside the test shim, megatron-core's torch.cuda.current_device() fails on a CPU-only torch: the package
    says so up front instead of failing inside a layer."""

    def no_cuda():
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    with pytest.raises(ConfigError, match="backend=megatron needs a CUDA GPU"):
        parallel.init_model_parallel(1, 1)


def test_missing_megatron_core_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # `import megatron.core` now raises ImportError
    with pytest.raises(ConfigError, match=r'megatron-core, which is not installed: pip install "llmprune\[megatron'):
        convert.check_convertible(tiny_config("llama"), 1)
