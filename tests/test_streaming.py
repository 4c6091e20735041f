"""model.streaming: calibrating layer by layer from the safetensors shards and writing pruned/ tensor by tensor gives
the in-memory run's scores, plan and exported weights bit for bit, on every family; stock transformers loads the
result; runs that cannot stream say so before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny, tiny_run_overrides
from regression_cases import weights_hash
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DISTILL = ("distill.max_steps=0", "prune.depth.num_samples=2", "prune.export_config.ffn_hidden_size=null")
CASES = {  # family -> (tiny model overrides, targets)
    "llama": ({"tie_word_embeddings": True}, ["export.max_shard_size=20KB", "prune.export_config.hidden_size=40",
                                               "prune.export_config.ffn_hidden_size=48",
                                               "prune.export_config.num_attention_heads=4",
                                               "prune.export_config.num_layers=3"]),
    "qwen3": ({}, ["prune.export_config.hidden_size=40", "prune.export_config.num_query_groups=1",
                   "prune.export_config.num_layers=3", "prune.depth.method=contiguous", "prune.depth.metric=kl"]),
    "nemotron_h": ({}, ["prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
                        "prune.export_config.num_layers=4", "prune.export_config.mamba_num_heads=8",
                        "prune.export_config.mamba_head_dim=6", "prune.export_config.num_attention_heads=4"]),
    "mamba2": ({}, ["prune.export_config.hidden_size=32", "prune.export_config.mamba_num_heads=8",
                    "prune.export_config.num_layers=3"]),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_streaming_equals_in_memory(family, tmp_path):
    extra, targets = CASES[family]
    model_dir = save_tiny(family, tmp_path / "model", **extra)
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        report = llmprune.run("smollm2_minitron", tiny_run_overrides(
            model_dir, out, *NO_DISTILL, *targets, f"model.streaming={mode}"))
        runs[mode] = (out, report)
    (mem_dir, mem), (st_dir, st) = runs["false"], runs["true"]
    assert "streaming" in st and "streaming" not in mem
    mem_scores, st_scores = load_file(mem_dir / "importance.safetensors"), load_file(st_dir / "importance.safetensors")
    assert mem_scores.keys() == st_scores.keys()
    assert all(torch.equal(mem_scores[k], st_scores[k]) for k in mem_scores), [
        k for k in mem_scores if not torch.equal(mem_scores[k], st_scores[k])]
    assert (mem_dir / "plan.json").read_text() == (st_dir / "plan.json").read_text()
    assert weights_hash(mem_dir / "pruned") == weights_hash(st_dir / "pruned")
    assert st["params"]["after"] == mem["params"]["after"] < mem["params"]["before"] == st["params"]["before"]
    for who in ("teacher", "pruned"):
        assert st["eval"][who]["perplexity"] == pytest.approx(mem["eval"][who]["perplexity"], rel=1e-5)
    assert st["eval"]["pruned"]["kl_to_teacher"] == pytest.approx(mem["eval"]["pruned"]["kl_to_teacher"], rel=1e-4)

    # stock transformers loads the streamed directory and computes what the in-memory pruned model computes
    ids = torch.randint(2, 128, (1, 12))
    streamed = AutoModelForCausalLM.from_pretrained(st_dir / "pruned").eval()
    reference = AutoModelForCausalLM.from_pretrained(mem_dir / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)
    assert streamed.config.num_hidden_layers == len(json.loads((st_dir / "plan.json").read_text())["kept_layers"])
    assert (st_dir / "pruned" / "tokenizer.json").is_file() and (st_dir / "pruned" / "README.md").is_file()


def test_auto_streams_a_checkpoint_larger_than_the_memory_share(tmp_path, tiny_model_dirs):
    out = tmp_path / "run"
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(
        tiny_model_dirs["llama"], out, *NO_DISTILL, "prune.export_config.hidden_size=40",
        "model.streaming_memory_fraction=1e-12"))  # any checkpoint is larger than that
    assert report["streaming"]["checkpoint_bytes"] > 0
    with pytest.raises(ConfigError, match=r"distill.max_steps=2; set 0"):  # auto would stream, but distillation can't
        llmprune.run("smollm2_minitron", tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "r2",
                                                            "model.streaming_memory_fraction=1e-12"))


def test_streaming_refuses_what_it_cannot_do(tmp_path, smollm2_path, tiny_model_dirs):
    with pytest.raises(ConfigError, match=r"model.streaming=true prunes without loading the model, but distillation"):
        llmprune.load_config("smollm2_minitron", ["model.streaming=true"])
    with pytest.raises(ConfigError, match=r"model.streaming='sometimes' is not one of: auto, true, false"):
        llmprune.load_config("smollm2_minitron", ["model.streaming=sometimes"])
    with pytest.raises(ConfigError, match=r"needs a local Hugging Face directory with safetensors"):  # a GGUF file
        llmprune.run("smollm2_minitron", [f"output_dir={tmp_path / 'g'}", "model.streaming=true", *NO_DISTILL])
