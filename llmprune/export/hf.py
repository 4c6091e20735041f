"""Export a pruned model as a Hugging Face directory that stock transformers loads (no remote code).

Written atomically: everything goes to a temporary sibling directory that replaces the target in one rename.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmprune.errors import ConfigError


def _config_accepts(config) -> str | None:
    """None if the config class re-validates this config (as from_pretrained will), else the reason."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as err:  # transformers raises several validation error types
        return str(err).strip().splitlines()[-1].strip()
    return None


def check_exportable(adapter, target: dict[str, int], architecture: str = "auto") -> None:
    """Fail before any work when no stock config can express `target` (the same rule export applies)."""
    config = copy.deepcopy(adapter.config)
    adapter.rewrite_config(config, target, list(range(target["num_layers"])))
    reason = _config_accepts(config)
    if reason is not None and (architecture != "auto" or adapter.stock_alternative(config) is None):
        raise ConfigError(_no_stock_config_message(config, reason, architecture))


def _no_stock_config_message(config, reason: str, architecture: str) -> str:
    hint = "" if architecture == "auto" else " Set export.architecture=auto to allow an equivalent stock class."
    return (f"{type(config).__name__} rejects the pruned shape ({reason}) and no stock architecture can express "
            "it; choose targets this config accepts (for example make prune.export_config.hidden_size a multiple "
            f"of num_attention_heads).{hint}")


def exportable_model(model, adapter, architecture: str = "auto"):
    """The model to save and a note on which architecture is written and why.

    When the model's own config class rejects the pruned shape (LlamaConfig wants hidden % heads == 0 even with
    an explicit head_dim) and `architecture` is 'auto', the weights move into the adapter's architecture-identical
    stock class. Raises ConfigError when no stock config can express the shape.
    """
    config, model_cls, note = export_architecture(adapter, model.config, type(model), architecture)
    if model_cls is type(model):
        return model, note
    with torch.device("meta"):
        converted = model_cls(config)
    converted.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        converted.get_output_embeddings().weight = converted.get_input_embeddings().weight
    converted.generation_config = model.generation_config
    converted.eval()
    return converted, note


def export_architecture(adapter, config, model_cls, architecture: str = "auto"):
    """(config, model class, note) to write a model of this pruned `config` as: its own, or, when its config class
    rejects the shape and `architecture` is 'auto', the adapter's architecture-identical stock class (same tensor
    names). Raises ConfigError when no stock config can express the shape."""
    reason = _config_accepts(config)
    if reason is None:
        return config, model_cls, f"{model_cls.__name__} (the model's own architecture)"
    alternative = adapter.stock_alternative(config) if architecture == "auto" else None
    if alternative is None:
        raise ConfigError(_no_stock_config_message(config, reason, architecture))
    new_config, new_cls = alternative
    return new_config, new_cls, (f"{new_cls.__name__} (architecture-identical to {model_cls.__name__}, whose config "
                                 f"rejects this shape: {reason})")


def atomic_directory(target: Path, write) -> None:
    """Call write(tmp_dir) and move tmp_dir to `target` in one rename, replacing an older `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_hf(model, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None,
            max_shard_size: str = "2GB") -> None:
    """save_pretrained (sharded safetensors, config, generation config) + tokenizer + extra files, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for path in tmp.rglob("*"):  # safetensors writes its files 0600; the export is meant to be shared
            if path.is_file():
                path.chmod(0o644)

    atomic_directory(out_dir, write)


GENERATE_CHECK_TOKENS = 4


@torch.no_grad()
def verify_export(out_dir: Path, reference, input_ids: torch.Tensor) -> dict:
    """Reload `out_dir` with stock AutoModelForCausalLM, compare its logits with `reference`'s, and generate a few
    tokens with its default cache, as users run it (a plain forward without a cache can pass where generate()
    fails: a hybrid without attention layers)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=reference.dtype).to(input_ids.device).eval()
    expected = reference(input_ids=input_ids, use_cache=False).logits.float()
    got = reloaded(input_ids=input_ids, use_cache=False).logits.float()
    generated = reloaded.generate(input_ids[:1, :8], max_new_tokens=GENERATE_CHECK_TOKENS, do_sample=False,
                                  pad_token_id=reloaded.config.eos_token_id)
    return {"reloaded_class": type(reloaded).__name__, "max_abs_logit_diff": float((got - expected).abs().max()),
            "generated_tokens": int(generated.shape[1] - min(8, input_ids.shape[1]))}


def push_to_hub(folder: Path, repo_id: str, private: bool = True, endpoint: str | None = None,
                message: str = "llmprune export") -> dict:
    """Create `repo_id` if needed and upload `folder` as one commit. Token: HF_TOKEN or the CLI login."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint) if endpoint else HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    return {"repo_id": repo_id, "url": str(url), "commit": getattr(commit, "oid", None)}
