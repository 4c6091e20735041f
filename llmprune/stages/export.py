"""The export stages: pruned/ and final/ as Hugging Face directories, checked by a stock reload; with streaming,
pruned/ is written tensor by tensor from the source shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from llmprune.distributed import barrier, is_rank_zero
from llmprune.errors import ConfigError
from llmprune.export.gguf import check_gguf_exportable, write_gguf
from llmprune.export.hf import atomic_directory, export_architecture, exportable_model, save_hf, verify_export
from llmprune.plan import PruningPlan
from llmprune.pruning.apply import pruned_config
from llmprune.pruning.stream import write_pruned_shards
from llmprune.report import model_card

# what a model directory holds besides weights and config; copied as they are by the streaming export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def _extra_files(run_dir: Path, report: dict, name: str) -> dict[str, str]:
    return {"README.md": model_card({**report, "stage": name}),
            "pruning_plan.json": (run_dir / "plan.json").read_text()}


def export_stage(name: str, model, adapter, tokenizer, run_dir: Path, export: DictConfig, report: dict,
                 probe: torch.Tensor) -> str:
    """Write run_dir/<name> (rank zero; with gguf in export.formats also <name>/model.gguf), verify the reload;
    returns which architecture was written."""
    if "gguf" in export.formats:
        check_gguf_exportable(model, tokenizer)  # before the Hugging Face export, not half-way through
    to_save, architecture = exportable_model(model, adapter, export.architecture)
    report["architecture_written"] = architecture
    if is_rank_zero():
        save_hf(to_save, tokenizer, run_dir / name, _extra_files(run_dir, report, name), export.max_shard_size)
        if "gguf" in export.formats:
            report.setdefault("gguf", {})[name] = write_gguf(to_save, tokenizer, run_dir / name / "model.gguf",
                                                             export.gguf_type)
        if export.verify:
            report.setdefault("export_check", {})[name] = verify_export(run_dir / name, model, probe)
    barrier()
    return architecture


def export_streaming(name: str, stream, plan: PruningPlan, run_dir: Path, export: DictConfig, report: dict,
                     dtype: torch.dtype | None) -> dict:
    """Write run_dir/<name> from the source shards one tensor at a time (see pruning/stream.py), atomically.

    The config is the rewritten one, or export.architecture=auto's architecture-identical stock config where the
    model's own rejects the shape (the same tensor names). Returns what was written."""
    if "gguf" in export.formats:
        raise ConfigError("export.formats contains gguf, which is written from the model in memory, but this run "
                          "prunes tensor by tensor (model.streaming); set model.streaming=false or "
                          "export.formats=[hf].")
    adapter = stream.adapter
    config, _, note = export_architecture(adapter, pruned_config(adapter, plan), type(stream.model),
                                          export.architecture)
    report["architecture_written"] = note + ", written tensor by tensor"
    skip = (adapter.pruning_map().tied[0],) if getattr(config, "tie_word_embeddings", False) else ()
    written: dict = {}

    def write(tmp: Path) -> None:
        written.update(write_pruned_shards(stream.checkpoint, adapter.pruning_map(), plan, tmp, export.max_shard_size,
                                           dtype, skip))
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        for file in TOKENIZER_FILES:
            if (stream.checkpoint.folder / file).exists():
                shutil.copy2(stream.checkpoint.folder / file, tmp / file)
        for file_name, content in _extra_files(run_dir, report, name).items():
            (tmp / file_name).write_text(content, encoding="utf-8")

    atomic_directory(run_dir / name, write)
    return written
