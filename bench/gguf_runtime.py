"""Usage: python bench/gguf_runtime.py [--model-dir outputs/bench_default/final] [--windows 8] [--new-tokens 64]

The pruned SmolLM2 (the default recipe's final/, made by bench/default_run.py) where users run it: llama.cpp (the
xllamacpp wheels, its default settings, 2 threads) from GGUF files written by llmprune (f16 and q8_0), against stock
transformers (fp32) on this CPU. Reported per runtime and file type: the file size, the held-out perplexity (the
default recipe's held-out windows; llama.cpp scores teacher-forced, see llmprune/export/llama_cpp.py), and the
prompt-processing and generation speed in tokens/s (median of 3; a 128-token prompt, --new-tokens greedy tokens).
Writes bench/results/gguf_runtime.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, md_table, write_results  # noqa: E402

from llmprune import data as text  # noqa: E402
from llmprune.evaluate import evaluate  # noqa: E402
from llmprune.export.gguf import write_gguf  # noqa: E402
from llmprune.export.llama_cpp import LlamaCpp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 128


def transformers_speed(model, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Prefill tokens/s (one forward over the prompt) and generation tokens/s (greedy, KV cache, prefill removed)."""
    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(prompt, use_cache=True)
        return time.perf_counter() - start

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - start

    prefill(), generate()  # warm-up
    p = statistics.median(prefill() for _ in range(3))
    g = statistics.median(generate() for _ in range(3))
    return {"prompt_tokens_per_s": prompt.shape[1] / p, "generation_tokens_per_s": new_tokens / (g - p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="outputs/bench_default/final")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens scored")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = ROOT / args.model_dir
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir} holds no model: run `python bench/default_run.py` first (or pass --model-dir).")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the default recipe's split (data.* defaults), so these are the windows its report calls held-out
    splits = text.split_stream(text.token_stream(text.embedded_documents(), tokenizer), 256, 32, 16, 0.1, 0)
    windows = splits.heldout[: args.windows]  # (N, 256)
    prompt = windows[:1, :PROMPT]
    rows, payload = [], {"model_dir": args.model_dir, "windows": list(windows.shape), "new_tokens": args.new_tokens}
    ppl = evaluate(model, text.to_batches(windows, 4))["perplexity"]
    speed = transformers_speed(model, prompt, args.new_tokens)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    payload["transformers_fp32"] = {"bytes": weights, "perplexity": ppl, **speed}
    rows.append(["transformers", "fp32 safetensors", f"{weights / 2**20:.1f}", ppl, ppl, speed["prompt_tokens_per_s"],
                 speed["generation_tokens_per_s"]])
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in ("f16", "q8_0"):
            path = Path(tmp) / f"model-{gguf_type}.gguf"
            write_gguf(model, tokenizer, path, gguf_type)
            exact = LlamaCpp(path, n_ctx=512, threads=2, exact=True).perplexity(windows)  # f32 KV cache
            runtime = LlamaCpp(path, n_ctx=512, threads=2, exact=False)
            start = time.perf_counter()
            ppl = runtime.perplexity(windows)
            scored_s = time.perf_counter() - start
            runs = [runtime.speed(prompt[0].tolist(), args.new_tokens) for _ in range(3)]
            speed = {key: statistics.median(r[key] for r in runs)
                     for key in ("prompt_tokens_per_s", "generation_tokens_per_s")}
            size = path.stat().st_size
            payload[f"llama_cpp_{gguf_type}"] = {"bytes": size, "perplexity": ppl, "perplexity_f32_kv": exact,
                                                 "scoring_s": scored_s, **speed}
            rows.append(["llama.cpp", f"{gguf_type} GGUF", f"{size / 2**20:.1f}", exact, ppl,
                         speed["prompt_tokens_per_s"], speed["generation_tokens_per_s"]])
            del runtime
    base = payload["transformers_fp32"]["perplexity"]
    markdown = "\n\n".join([
        f"# The pruned SmolLM2 ({args.model_dir}) in llama.cpp vs transformers, this CPU (2 threads)",
        md_table(["runtime", "weights", "size (MiB)", "perplexity (f32 KV cache)", "perplexity (llama.cpp defaults)",
                  "prompt tokens/s", "generation tokens/s"], rows),
        f"Perplexity on {windows.shape[0]} held-out windows of {windows.shape[1]} tokens (the default recipe's "
        f"held-out split); relative to transformers with an f32 KV cache and no flash attention (the file's own "
        f"fidelity): f16 {payload['llama_cpp_f16']['perplexity_f32_kv'] / base - 1:+.2%}, q8_0 "
        f"{payload['llama_cpp_q8_0']['perplexity_f32_kv'] / base - 1:+.2%}; with llama.cpp's defaults (f16 KV cache, "
        f"flash attention where it chooses): f16 {payload['llama_cpp_f16']['perplexity'] / base - 1:+.2%}, q8_0 "
        f"{payload['llama_cpp_q8_0']['perplexity'] / base - 1:+.2%}. "
        f"Speed: a {PROMPT}-token prompt, then {args.new_tokens} greedy tokens; median of 3 after a warm-up "
        "(transformers: eager fp32 with its KV cache; llama.cpp: its default settings). Load average (1, 5, 15 min) "
        f"when done: {machine_info()['loadavg_1_5_15']} on {machine_info()['cpus']} CPUs: other work on the machine "
        "slows both runtimes."])
    write_results("gguf_runtime", markdown, payload)


if __name__ == "__main__":
    main()
