"""Architecture adapters: the only code that knows module names. One file per model family."""

from __future__ import annotations

from torch import nn

from llmprune.adapters.encoder import BertAdapter, GPTJAdapter
from llmprune.adapters.llama import LlamaAdapter
from llmprune.adapters.mamba2 import Mamba2Adapter
from llmprune.adapters.nemotron_h import NemotronHAdapter
from llmprune.errors import ConfigError

ADAPTERS = (LlamaAdapter, NemotronHAdapter, Mamba2Adapter, BertAdapter, GPTJAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module):
    """The adapter for a loaded model, chosen by `model.config.model_type`.

    Raises:
        ConfigError: the family is not supported (the message lists the supported ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise ConfigError(f"Unsupported model family '{model_type}'. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
                      "Pass model.path pointing to one of these (a Hugging Face directory, Hub id or .gguf file).")
