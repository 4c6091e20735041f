"""Streaming prune of checkpoints larger than memory: peak resident memory against checkpoint size.

Builds llama-like checkpoints of random float32 weights (this CPU has no fast bf16 matmul; hidden 4096, FFN 11008,
32 heads in 8 KV groups, vocab 32000; the layer count sets the size), written shard by shard so the builder never
holds the model, then runs `python -m llmprune` with model.streaming=true to a width + depth target (calibration,
Block Importance, export, held-out evaluation) in a child process and records its peak RSS and wall time. A stock
transformers reload of pruned/ runs in another child process (forward pass on a probe, parameter count). Where the
in-memory path fits (--in-memory-max-gb), it runs too and its pruned/ must hash the same.

    python bench/streaming_memory.py --layers 11 22 --in-memory-max-gb 9
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import md_table, write_results
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from regression_cases import weights_hash  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=32000)
TARGET = ["prune.export_config.hidden_size=3072", "prune.export_config.ffn_hidden_size=8192"]
RUN = ["model.dtype=float32", "distill.max_steps=0", "data.num_samples=8", "data.seq_len=128", "data.batch_size=4",
       "data.eval_samples=4", "prune.depth.method=block_importance"]


def build_checkpoint(folder: Path, layers: int, tokenizer_from: Path) -> int:
    """A random llama checkpoint of `layers` layers, one safetensors shard per layer; returns its bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, dtype="float32")
    config.save_pretrained(folder)
    h, f, q, kv, v = (SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_attention_heads"] * 128,
                      SHAPE["num_key_value_heads"] * 128, SHAPE["vocab_size"])
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.float32)

    def shards():  # one shard's tensors at a time
        yield "model-outer.safetensors", {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
                                          "model.norm.weight": torch.ones(h, dtype=torch.float32)}
        for i in range(layers):
            p = f"model.layers.{i}."
            yield f"model-layer{i:03d}.safetensors", {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.float32),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float32),
                p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f)}

    weight_map, total = {}, 0
    for file, tensors in shards():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def child(argv: list[str]) -> dict:
    """Run `python argv...` in a child process; its wall time, its own peak RSS in bytes (see _peak.py), the peak
    per pipeline stage with its anonymous / file-backed split, and its output."""
    start = time.perf_counter()
    env = {**os.environ, "LLMPRUNE_STAGE_PEAKS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "_peak.py"), *argv], capture_output=True,
                          text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = proc.stderr.splitlines()
    peak = [int(line.split()[1]) for line in lines if line.startswith("__peak_rss_kb__")]
    stages = {}
    for line in lines:
        if line.startswith("__stage_peak_kb__"):
            _, stage, rss, anon, file = line.split()
            stages[stage] = {"rss": int(rss) * 1024, "anon": int(anon) * 1024, "file": int(file) * 1024}
    return {"seconds": round(seconds, 1), "peak_rss": peak[-1] * 1024, "stages": stages, "stdout": proc.stdout}


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = m(torch.arange(2, 34)[None]).logits
print(json.dumps({"class": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
                  "finite": bool(torch.isfinite(logits).all()), "hidden": m.config.hidden_size,
                  "layers": m.config.num_hidden_layers}))
"""


def tiny_tokenizer(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import save_tiny

    return Path(save_tiny("llama", folder, vocab_size=SHAPE["vocab_size"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 22], help="checkpoint sizes, in layers")
    parser.add_argument("--in-memory-max-gb", type=float, default=5.0,
                        help="also run the in-memory path for checkpoints up to this size")
    parser.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temporary dir)")
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        tokenizer = tiny_tokenizer(root / "tok")
        for layers in args.layers:
            src = root / f"ckpt{layers}"
            size = build_checkpoint(src, layers, tokenizer)
            depth = [f"prune.export_config.num_layers={layers - max(1, layers // 5)}"]
            run = {}
            for mode in ("true", "false"):
                if mode == "false" and size > args.in_memory_max_gb * 1e9:
                    continue
                out = root / f"out{layers}_{mode}"
                run[mode] = child(["-m", "llmprune", "recipe=smollm2_minitron", f"model.path={src}",
                                   f"output_dir={out}", f"model.streaming={mode}", *RUN, *TARGET, *depth])
                run[mode]["report"] = json.loads((out / "report.json").read_text())
                run[mode]["hash"] = weights_hash(out / "pruned")
                run[mode].pop("stdout")
            st = run["true"]
            reload = child(["-c", RELOAD, str(root / f"out{layers}_true" / "pruned")])
            check = json.loads(reload.pop("stdout").strip().splitlines()[-1])
            assert check["params"] == st["report"]["params"]["after"] and check["finite"], check
            same = run["false"]["hash"] == st["hash"] if "false" in run else None
            result = {"layers": layers, "checkpoint_bytes": size, "streaming": st, "reload": {**reload, **check},
                      "in_memory": run.get("false"), "identical_weights": same}
            results.append(result)
            mem = run.get("false")
            rows.append([layers, f"{size / 1e9:.2f}", f"{st['peak_rss'] / 1e9:.2f}",
                         f"{st['peak_rss'] / size:.1%}", st["seconds"],
                         f"{mem['peak_rss'] / 1e9:.2f}" if mem else "-", mem["seconds"] if mem else "-",
                         {True: "yes", False: "NO", None: "-"}[same],
                         "{:.2f}B -> {:.2f}B".format(*(st["report"]["params"][k] / 1e9 for k in ("before", "after"))),
                         f"{st['report']['eval']['teacher']['perplexity']:.0f} / "
                         f"{st['report']['eval']['pruned']['perplexity']:.0f}",
                         f"{reload['peak_rss'] / 1e9:.2f}"])
            shutil.rmtree(src)  # the disk holds one checkpoint at a time
    md = ("Streaming prune (model.streaming=true) of random llama checkpoints, float32, hidden 4096 -> 3072, FFN 11008 "
          "-> 8192, depth -20% by Block Importance, 8 calibration samples of 128 tokens\n\n"
          + md_table(["layers", "checkpoint GB", "streaming peak RSS GB", "peak / checkpoint", "streaming s",
                      "in-memory peak RSS GB", "in-memory s", "same weights", "params", "held-out ppl teacher/pruned "
                      "(random weights)", "stock reload peak GB"], rows))
    stage_rows = [[r["layers"], stage, f"{v['rss'] / 1e9:.2f}", f"{v['anon'] / 1e9:.2f}", f"{v['file'] / 1e9:.2f}"]
                  for r in results for stage, v in r["streaming"]["stages"].items()]
    md += ("\n\nPeak RSS per stage of the streaming runs (sampled every 20 ms; anonymous memory vs file-backed pages "
           "of mapped safetensors, which count in RSS while mapped):\n\n"
           + md_table(["layers", "stage", "RSS GB", "anon GB", "file-backed GB"], stage_rows))
    write_results("streaming_memory", md, {"runs": results})


if __name__ == "__main__":
    main()
