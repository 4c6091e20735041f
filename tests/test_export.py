"""Export: GGUF loads save cleanly, the llama -> Mistral fallback is exact and reported, writes are atomic."""

from __future__ import annotations

import json
import stat

import pytest
import torch
import transformers
from conftest import save_tiny, tiny_batch, tiny_model, tiny_run_overrides
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.adapters import get_adapter
from llmprune.export.hf import atomic_directory, exportable_model, save_hf, verify_export
from llmprune.models import drop_gguf_quantization
from llmprune.plan import PruningPlan


@pytest.mark.slow
@torch.no_grad()
def test_gguf_model_saves_and_reloads_without_quantization_config(smollm2_loaded, tmp_path):
    model, tokenizer, source = smollm2_loaded
    assert source.gguf_file and source.gguf_file.endswith(".gguf")
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path, safe_serialization=True)  # raises while a gguf quantization config remains
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config, sorted(config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_drop_gguf_quantization_removes_the_config(tmp_path):
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    drop_gguf_quantization(model)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def student_from_plan(model_dir, run_dir):
    """Rebuild the pruned model in memory from the teacher and plan.json (independent of the export)."""
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = get_adapter(teacher).apply(PruningPlan.from_json((run_dir / "plan.json").read_text()))
    return teacher


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@torch.no_grad()
def test_llama_to_mistral_fallback_is_exact_and_reported(tmp_path, tied):
    model_dir = save_tiny("llama", tmp_path / "model", tie_word_embeddings=tied)
    run_dir = tmp_path / "run"
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(
        model_dir, run_dir, "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=64"))

    written = report["architecture_written"]
    assert written.startswith("MistralForCausalLM (architecture-identical to LlamaForCausalLM"), written
    assert "The hidden size (40) is not a multiple of the number of attention heads (6)" in written, written
    assert written in (run_dir / "report.md").read_text()
    assert written in (run_dir / "pruned" / "README.md").read_text()
    for stage in ("pruned", "final"):
        assert report["export_check"][stage] == {"reloaded_class": "MistralForCausalLM", "max_abs_logit_diff": 0.0,
                                                   "generated_tokens": 4}

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "pruned").eval()
    assert type(reloaded) is transformers.MistralForCausalLM
    assert (reloaded.config.hidden_size, reloaded.config.head_dim, reloaded.config.sliding_window) == (40, 8, None)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    ids = tiny_batch(2, 24)
    expected = student_from_plan(model_dir, run_dir)(ids).logits
    assert torch.equal(reloaded(ids).logits, expected), (reloaded(ids).logits - expected).abs().max()


def test_own_architecture_is_kept_when_its_config_accepts_the_shape():
    model = tiny_model("llama")
    to_save, written = exportable_model(model, get_adapter(model))
    assert to_save is model and written == "LlamaForCausalLM (the model's own architecture)"


@torch.no_grad()
def test_verify_export_detects_different_weights(tmp_path):
    save_hf(tiny_model("llama", seed=0), None, tmp_path / "out")
    ids = tiny_batch(1, 8)
    assert verify_export(tmp_path / "out", tiny_model("llama", seed=0), ids)["max_abs_logit_diff"] == 0.0
    assert verify_export(tmp_path / "out", tiny_model("llama", seed=1), ids)["max_abs_logit_diff"] > 1e-3


def test_exported_files_are_readable_by_others(tmp_path):
    save_hf(tiny_model("llama"), None, tmp_path / "out", {"README.md": "card"})
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & stat.S_IROTH, f"{path.name} is {oct(path.stat().st_mode)}"
    assert (tmp_path / "out").stat().st_mode & stat.S_IROTH


def test_atomic_directory_keeps_the_old_export_when_writing_fails(tmp_path):
    target = tmp_path / "pruned"
    atomic_directory(target, lambda d: (d / "model.txt").write_text("old"))

    def broken(d):
        (d / "model.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_directory(target, broken)
    assert (target / "model.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"], "no temporary directories may be left behind"
    atomic_directory(target, lambda d: (d / "model.txt").write_text("new"))
    assert (target / "model.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_failed_rerun_does_not_lose_the_previous_export(tiny_model_dirs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], run_dir, "prune.export_config.ffn_hidden_size=null")
    llmprune.run("smollm2_minitron", [*overrides, "prune.export_config.hidden_size=36"])
    before = {p.name: p.read_bytes() for p in (run_dir / "pruned").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", fail)  # after the weights
    with pytest.raises(OSError, match="disk full"):
        llmprune.run("smollm2_minitron", [*overrides, "prune.export_config.hidden_size=42"])
    after = {p.name: p.read_bytes() for p in (run_dir / "pruned").iterdir()}
    assert after == before
    assert AutoModelForCausalLM.from_pretrained(run_dir / "pruned").config.hidden_size == 36
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
