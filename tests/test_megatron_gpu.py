"""Megatron backend on CUDA (marked gpu; skipped without a GPU): no CPU shim, megatron-core's own device and RNG
handling, TransformerEngine layers where installed (megatron.transformer_impl=auto), nccl; TP=2 and PP=2 under
torchrun where two GPUs are visible. The CPU tier (tests/test_megatron.py) checks the same things bit for bit."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_batch, tiny_model, tiny_run_overrides
from safetensors.torch import load_file

from llmprune.adapters import get_adapter
from llmprune.data import to_batches
from llmprune.importance.activation import activation_scores
from llmprune.plan import PruningPlan, make_plan

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"hidden_size": 40, "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1,
           "num_layers": 3}
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision, so logits compare tightly with the HF model's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("impl", ["auto", "local"])
def test_megatron_on_cuda_matches_hf(impl, no_tf32):
    from llmprune.backends.megatron.adapter import MegatronGPTAdapter

    hf = tiny_model("qwen3").cuda()
    adapter = MegatronGPTAdapter.from_hf(hf, transformer_impl=impl)
    try:
        print(f"\ntransformer_impl={impl} -> {adapter.impl}")
        ids = tiny_batch().cuda()
        with torch.no_grad():
            diff = (adapter.lm_logits(ids) - hf(input_ids=ids).logits).abs().max().item()
        assert diff < 1e-3, diff  # TransformerEngine's kernels round differently from cuBLAS / sdpa

        batches = to_batches(tiny_batch(4), 2)
        hf_scores = activation_scores(hf, get_adapter(hf), batches)
        scores = activation_scores(adapter.model, adapter, batches)
        for name, value in scores.items():
            expected = hf_scores[name.replace("pre_mlp_layernorm", "post_attention_layernorm")]
            assert ((value - expected).abs().max() / expected.abs().max()).item() < 1e-3, name

        hf_adapter = get_adapter(hf)
        plan = make_plan(hf_adapter.family, hf_scores, hf_adapter.dims(), TARGETS, "block_importance",
                         rescale_norms=True)
        student = copy.deepcopy(hf)
        student = get_adapter(student).apply(plan)
        adapter.apply(plan)
        exported, expected = adapter.to_hf(hf).state_dict(), student.state_dict()
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)  # slicing is exact on any device
    finally:
        adapter.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_tensor_and_pipeline_parallel_2_on_gpus(tiny_model_dirs, tmp_path):
    """`python -m llmprune` itself (no shim) with TP=2, then PP=2, over two GPUs (nccl) against one GPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    targets = ("prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
               "prune.export_config.num_attention_heads=4", "prune.export_config.num_layers=3",
               "prune.depth.num_samples=2", "distill.max_steps=0", "backend=megatron", "model.device=cuda")
    runs = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out = tmp_path / f"tp{tp}_pp{pp}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
                   "-m", "llmprune", "recipe=smollm2_minitron",
                   *tiny_run_overrides(tiny_model_dirs["llama"], out, *targets, f"megatron.tensor_parallel_size={tp}",
                                       f"megatron.pipeline_parallel_size={pp}")]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[tp, pp] = out
    plan_1 = PruningPlan.from_json((runs[1, 1] / "plan.json").read_text())
    w1 = load_file(str(runs[1, 1] / "pruned" / "model.safetensors"))
    for split in ((2, 1), (1, 2)):
        plan_2 = PruningPlan.from_json((runs[split] / "plan.json").read_text())
        assert (plan_2.kept_layers, plan_2.hidden, plan_2.ffn, plan_2.heads) == (
            plan_1.kept_layers, plan_1.hidden, plan_1.ffn, plan_1.heads), split
        w2 = load_file(str(runs[split] / "pruned" / "model.safetensors"))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), split
