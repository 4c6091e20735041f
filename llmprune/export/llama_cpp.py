"""llama.cpp in this process (the `xllamacpp` CPU wheels, its native server API): what a GGUF file generates, its
log-probabilities of given text, and its speed - the checks and numbers of an exported model.

llama.cpp's server returns log-probabilities only for tokens it generates, never for the prompt (no `echo`), so text
is scored teacher-forced: each step generates one token forced by a logit bias to be the text's next one, over the
KV cache of the steps before; the reported log-probability comes from the raw logits, before the bias.
"""

from __future__ import annotations

import math
from pathlib import Path

from llmprune.errors import ConfigError

FORCE = 1.0e4  # a logit bias no real logit gap overcomes


class LlamaCpp:
    """One GGUF model in llama.cpp with one sequence slot.

    Args:
        path: the .gguf file.
        n_ctx: context length of the slot (prompt + generated tokens).
        threads: CPU threads for prompt processing and generation.
        exact: f32 KV cache and no flash attention (llama.cpp's f16 Q·K moves logits by ~1e-3), for comparisons
            with transformers; False keeps llama.cpp's defaults, for speed.
    """

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, exact: bool = True):
        try:
            import xllamacpp as xlc
        except ImportError as err:
            raise ConfigError(f"running a GGUF in llama.cpp needs xllamacpp: pip install 'llmprune[gguf]' ({err})") \
                from None
        if not Path(path).is_file():
            raise ConfigError(f"GGUF file '{path}' does not exist.")
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel = n_ctx, 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        if exact:
            params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.n_ctx = n_ctx
        self.server = xlc.Server(params)

    def _complete(self, request: dict) -> dict:
        out = self.server.handle_completions({"temperature": 0, "top_k": 1, "ignore_eos": True, **request})
        if "choices" not in out:  # the server answers errors as a dict, not an exception
            raise RuntimeError(f"llama.cpp refused {sorted(request)}: {out}")
        return out

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """The n greedy token ids after `prompt`."""
        out = self._complete({"prompt": prompt, "n_predict": n, "n_probs": 1, "cache_prompt": False})
        return [step["id"] for step in out["choices"][0]["logprobs"]["content"]]

    def logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, teacher-forced (one forced step per token)."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the slot's n_ctx={self.n_ctx}")
        scores = []
        for i in range(1, len(ids)):
            out = self._complete({"prompt": ids[:i], "n_predict": 1, "n_probs": 1, "cache_prompt": True,
                                  "logit_bias": [[ids[i], FORCE]]})
            step = out["choices"][0]["logprobs"]["content"][0]
            assert step["id"] == ids[i], (step["id"], ids[i])
            scores.append(step["logprob"])
        return scores

    def perplexity(self, windows) -> float:
        """Token-mean perplexity over the rows of `windows` (N, S): each row scored from its first token, as
        transformers' next-token loss scores a row."""
        total, count = 0.0, 0
        for row in windows:
            scores = self.logprobs([int(t) for t in row])
            total -= sum(scores)
            count += len(scores)
        return math.exp(total / count)

    def speed(self, prompt: list[int], n: int) -> dict[str, float]:
        """Prompt processing and generation speed (tokens/s) of one request, from llama.cpp's own timings."""
        out = self._complete({"prompt": prompt, "n_predict": n, "cache_prompt": False})
        t = out["timings"]
        return {"prompt_tokens": t["prompt_n"], "prompt_tokens_per_s": t["prompt_per_second"],
                "generated_tokens": t["predicted_n"], "generation_tokens_per_s": t["predicted_per_second"]}
