"""The Python API for people with their own training loop (ModelOpt-like)."""

from __future__ import annotations

import torch

from llmprune.adapters import get_adapter
from llmprune.data import as_batches, to_batches
from llmprune.errors import ConfigError
from llmprune.importance import MODES, unit_scores
from llmprune.importance.depth import removal_scores
from llmprune.plan import TARGET_KEYS, PruningPlan, make_plan, resolve_targets


def compute_scores(model, calib_data, tokenizer=None, *, export_config: dict | None = None, mode: str = "minitron",
                   importance: str = "activation", depth_method: str = "drop_one", depth_metric: str = "lm_loss",
                   depth_samples: int = 6, seq_len: int = 256, batch_size: int = 4,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Importance scores for `model` (forward passes only for 'activation'); pass them to `prune(scores=...)`.

    Depth removal scores are computed only when `export_config` removes layers with drop_one / contiguous.
    """
    adapter = get_adapter(model)
    batches = as_batches(calib_data, tokenizer, seq_len, batch_size)
    scores = unit_scores(mode, importance, model, adapter, batches, seed)
    dims = adapter.dims()
    target = resolve_targets(dims, {k: v for k, v in (export_config or {}).items() if v is not None}, prefix="",
                             family=adapter.family)
    drop = dims["num_layers"] - target["num_layers"]
    if drop and depth_method in ("drop_one", "contiguous"):
        ids = torch.cat([b.input_ids for b in batches])[:depth_samples]
        masks = None  # keep the padding masks: padding must not enter the depth scores either
        if any(b.attention_mask is not None for b in batches):
            masks = torch.cat([torch.ones_like(b.input_ids) if b.attention_mask is None else b.attention_mask
                               for b in batches])[:depth_samples]
        depth_batches = to_batches(ids, batch_size, masks)
        scores.update(removal_scores(model, adapter, depth_batches, depth_metric, drop_one=depth_method == "drop_one",
                                     block_sizes=(drop,) if depth_method == "contiguous" else ()))
    return scores


def prune(model, mode: str = "minitron", export_config: dict | None = None, calib_data=None, tokenizer=None, *,
          scores: dict[str, torch.Tensor] | None = None, importance: str = "activation",
          depth_method: str = "drop_one", depth_metric: str = "lm_loss", depth_samples: int = 6,
          seq_len: int = 256, batch_size: int = 4, rescale_norms: bool = True,
          constraints: dict | None = None, loss_fn=None, rule: str = "knapsack", flops_seq_len: int | None = None,
          seed: int = 0) -> tuple[torch.nn.Module, PruningPlan]:
    """Prune a Hugging Face model with Minitron (targets) or GradNAS (a budget); return it with its plan.

    Args:
        model: a loaded llama / mistral / qwen2 / qwen3 / nemotron_h / mamba2 causal LM (minitron); a BERT encoder
            (bare, masked LM or classifier), GPT-J or llama-like decoder (gradnas).
        mode: "minitron" | "gradnas".
        export_config: (minitron) targets by ModelOpt name, e.g. {"hidden_size": 448, "ffn_hidden_size": 1024}.
        constraints: (gradnas) {"params": 3e7 or "60%", "flops": ...}; see prune.constraints.
        loss_fn: (gradnas) "mlm" | "causal_lm" | "contrastive" | "task" or a callable (model, Batch) -> loss;
            None picks as prune.gradnas.loss=auto does.
        rule / flops_seq_len: (gradnas) prune.gradnas.rule and .seq_len (FLOPs are counted at flops_seq_len,
            default seq_len).
        calib_data: LongTensor (N, S) of token ids, a list of strings (with `tokenizer`), or an iterable of
            {"input_ids", "attention_mask"} batches. Not needed when `scores` is given.
        scores: scores from `compute_scores` (skips calibration).
        importance / depth_method / depth_metric / depth_samples / rescale_norms: see the recipe keys
            prune.importance, prune.depth.*, prune.rescale_norms.

    Returns:
        (the pruned model, a new module: `model` is left as it was; the PruningPlan). `plan.to_json()` is what
        the CLI writes as plan.json.
    """
    if mode not in MODES:
        raise ConfigError(f"Unknown mode '{mode}'. Known: {', '.join(MODES)}.")
    if mode == "gradnas":
        if export_config:
            raise ConfigError("mode='gradnas' chooses per-layer widths from `constraints`; do not pass export_config.")
        return _prune_gradnas(model, constraints, calib_data, tokenizer, loss_fn, rule, flops_seq_len or seq_len,
                              seq_len, batch_size, seed, scores)
    if constraints:
        raise ConfigError("constraints are a GradNAS budget; mode='minitron' takes export_config targets.")
    if not export_config:
        raise ConfigError("export_config is empty: pass targets such as {'hidden_size': 448}. Known keys: "
                          f"{', '.join(TARGET_KEYS)}.")
    adapter = get_adapter(model)
    resolve_targets(adapter.dims(), export_config, prefix="export_config.", family=adapter.family)  # fail early
    if scores is None:
        if calib_data is None:
            raise ConfigError("prune() needs calib_data (or scores from compute_scores).")
        scores = compute_scores(model, calib_data, tokenizer, export_config=export_config, mode=mode,
                                importance=importance,
                                depth_method=depth_method, depth_metric=depth_metric, depth_samples=depth_samples,
                                seq_len=seq_len, batch_size=batch_size, seed=seed)
    plan = make_plan(adapter.family, scores, adapter.dims(), export_config, depth_method, depth_metric, rescale_norms,
                     layer_types=getattr(adapter, "layer_types", None))
    return adapter.apply(plan), plan


def _prune_gradnas(model, constraints, calib_data, tokenizer, loss_fn, rule: str, flops_seq_len: int, seq_len: int,
                   batch_size: int, seed: int, scores=None) -> tuple[torch.nn.Module, PruningPlan]:
    """GradNAS: profile (fails on an unreachable budget before any gradient), score, choose widths, slice."""
    from llmprune.export.encoder import physically_pruned
    from llmprune.importance.gradnas import gradnas_scores
    from llmprune.plan.gradnas import GradNASSpace, gradnas_plan
    from llmprune.stages.gradnas import resolve_gradnas_loss

    if not constraints:
        raise ConfigError("mode='gradnas' needs constraints, e.g. {'flops': '60%'} or {'params': 3e7}.")
    loss = loss_fn if callable(loss_fn) else resolve_gradnas_loss(loss_fn or "auto", model)
    adapter = get_adapter(model)
    space = GradNASSpace(adapter.cost_model(), adapter.dims(), flops_seq_len)
    profile = space.profile(constraints, prefix="constraints.")
    profile.check()
    if scores is None:
        if calib_data is None:
            raise ConfigError("prune(mode='gradnas') needs calib_data (or scores).")
        scores = gradnas_scores(model, as_batches(calib_data, tokenizer, seq_len, batch_size), loss, tokenizer, seed)
    plan = gradnas_plan(adapter.family, space, scores, profile.bounds, rule)
    return physically_pruned(model, plan.heads, plan.ffn), plan
