"""Fixed pruning runs whose plan and exported weights must not change when the pruning code is restructured.

`python tests/regression_cases.py record` writes tests/data/regression.json (done once, on the code before a
refactor); tests/test_regression.py re-runs every case and compares. Each case is a recipe on a tiny random model of
its family (seeded, so the weights are the same everywhere) with targets that touch every prunable dimension the
family has; `smollm2_*` cases run the embedded real model. Weights are hashed tensor by tensor from pruned/.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from safetensors import safe_open

HERE = Path(__file__).parent
RECORD = HERE / "data" / "regression.json"
SMALL = ["data.num_samples=4", "data.eval_samples=2", "data.seq_len=32", "data.batch_size=2", "distill.max_steps=0",
         "prune.depth.num_samples=2", "eval.enabled=false"]

# name -> (recipe, family of the tiny model or "smollm2", overrides)
CASES = {
    "llama_width_depth": ("smollm2_minitron", "llama", [
        "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
        "prune.export_config.num_attention_heads=4", "prune.export_config.num_query_groups=2",
        "prune.export_config.num_layers=3"]),
    "llama_groups_contiguous": ("llama31_minitron_4b_depth", "llama", [
        "prune.export_config.num_layers=2", "prune.export_config.num_query_groups=1"]),
    "mistral_heads": ("smollm2_minitron", "mistral", [
        "prune.export_config.hidden_size=null", "prune.export_config.ffn_hidden_size=64",
        "prune.export_config.num_attention_heads=2", "prune.export_config.num_query_groups=1"]),
    "qwen2_bias": ("smollm2_minitron", "qwen2", [
        "prune.export_config.hidden_size=32", "prune.export_config.ffn_hidden_size=48",
        "prune.export_config.num_attention_heads=4"]),
    "qwen3_width": ("qwen3_minitron_width", "qwen3", [
        "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
        "prune.export_config.num_query_groups=1"]),
    "qwen3_depth_bi": ("qwen3_minitron", "qwen3", [
        "prune.export_config.num_layers=3", "prune.depth.method=block_importance"]),
    "nemotron_h_all": ("nemotronh_minitron", "nemotron_h", [
        "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
        "prune.export_config.num_layers=4", "prune.export_config.mamba_num_heads=8",
        "prune.export_config.mamba_head_dim=6", "prune.export_config.num_attention_heads=4"]),
    "mamba2_heads_dim": ("mamba2_minitron", "mamba2", [
        "prune.export_config.hidden_size=32", "prune.export_config.mamba_num_heads=8",
        "prune.export_config.mamba_head_dim=null", "prune.export_config.num_layers=3"]),
    "smollm2_small": ("smollm2_minitron", "smollm2", ["data.num_samples=8", "data.seq_len=128", "distill.max_steps=0",
                                                     "eval.enabled=false"]),
    "smollm2_default": ("smollm2_minitron", "smollm2", ["distill.max_steps=0", "eval.enabled=false"]),
}
FAST = [name for name, (_, family, _) in CASES.items() if family != "smollm2"]


def weights_hash(folder: Path) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the folder's safetensors files, by name; one tensor
    in memory at a time."""
    import torch

    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    h = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as f:
            t = f.get_tensor(name).contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def run_case(name: str, model_dirs: dict[str, str], out: Path) -> dict:
    """Run one case; returns {plan, weights} fingerprints."""
    import llmprune
    from llmprune.plan import PruningPlan

    recipe, family, overrides = CASES[name]
    base = [] if family == "smollm2" else [f"model.path={model_dirs[family]}", *SMALL]
    published = llmprune.load_config(recipe).prune.export_config
    nulls = [] if family == "smollm2" else [f"prune.export_config.{k}=null" for k, v in published.items()
                                            if v is not None]
    llmprune.run(recipe, [*base, *nulls, *overrides, f"output_dir={out}"])
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    return {"plan": plan.fingerprint(), "weights": weights_hash(out / "pruned")}


def tiny_dirs(root: Path) -> dict[str, str]:
    sys.path.insert(0, str(HERE))
    from conftest import save_tiny

    return {f: save_tiny(f, root / f) for f in ("llama", "mistral", "qwen2", "qwen3", "nemotron_h", "mamba2")}


if __name__ == "__main__":
    import tempfile

    names = sys.argv[2:] or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = tiny_dirs(Path(tmp) / "models")
        results = {name: run_case(name, dirs, Path(tmp) / name) for name in names}
    if sys.argv[1:2] == ["record"]:
        old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps({**old, **results}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(results, indent=1))
