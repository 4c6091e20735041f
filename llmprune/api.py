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
                   depth_samples: int = 12, seq_len: int = 256, batch_size: int = 4,
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
          depth_method: str = "drop_one", depth_metric: str = "lm_loss", depth_samples: int = 12,
          seq_len: int = 256, batch_size: int = 4, rescale_norms: bool = True,
          constraints: dict | None = None, loss_fn=None, rule: str = "knapsack", flops_seq_len: int | None = None,
          search: dict | None = None, heldout_data=None, distill_data=None, distill: dict | None = None,
          seed: int = 0) -> tuple[torch.nn.Module, PruningPlan]:
    """Prune a Hugging Face model with Minitron (targets) or GradNAS (a budget); return it with its plan.

    Args:
        model: a loaded llama / mistral / qwen2 / qwen3 / nemotron_h / mamba2 causal LM (minitron); a BERT encoder
            (bare, masked LM or classifier), GPT-J or llama-like decoder (gradnas).
        mode: "minitron" | "gradnas".
        export_config: (minitron) targets by ModelOpt name, e.g. {"hidden_size": 448, "ffn_hidden_size": 1024}.
        constraints: {"params": 3e7 or "60%", "flops": ...}; see prune.constraints. gradnas: per-layer widths within
            them; minitron (instead of export_config): the architecture search picks the candidate with the lowest
            held-out KL to `model` under params, flops, memory and "latency" (seconds of one prefill of
            search batch_size x seq_len tokens, measured here on `model`'s device for each candidate shape).
        search: (minitron with constraints) search.* keys: divisors, lowest_fraction, top_k, finalists,
            distill_tokens, seq_len, batch_size, memory_dtype, latency_repeats. finalists (default 0 here): the best
            of the top_k by pruned KL are each distilled for distill_tokens tokens on `distill_data` and ranked again
            by their KL after it (the returned model is the pick pruned, not distilled: training is yours).
        heldout_data: (minitron with constraints) the text the KL is measured on, as calib_data; None: calib_data.
        distill_data / distill: (search finalists) the packed token windows the finalists are distilled on (as
            calib_data, without padding), and distill.* settings (defaults: the recipe schema's).
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
        if export_config:
            raise ConfigError("mode='minitron' prunes to export_config or searches within constraints; pass one.")
        return _prune_search(model, constraints, calib_data, heldout_data, tokenizer, scores, search or {},
                             depth_method, depth_metric, depth_samples, rescale_norms, seq_len, batch_size, seed,
                             distill_data, distill or {})
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


def _prune_search(model, constraints: dict, calib_data, heldout_data, tokenizer, scores, search: dict,
                  depth_method: str, depth_metric: str, depth_samples: int, rescale_norms: bool, seq_len: int,
                  batch_size: int, seed: int, distill_data, distill: dict) -> tuple[torch.nn.Module, PruningPlan]:
    """Minitron search: profile (fails on an unreachable budget before any forward pass), score once, rank the
    search.top_k candidates using most of the budget by held-out KL after pruning, optionally re-rank the best
    search.finalists after a short distillation each, prune to the best."""
    from llmprune.config.schema import SearchConfig
    from llmprune.evaluate import evaluate
    from llmprune.plan import choose_layers
    from llmprune.search.latency import LatencyMeter
    from llmprune.search.rank import combined, rank
    from llmprune.search.space import SearchSpace, search_choices
    from llmprune.search.stage import HeldoutTeacher
    from llmprune.search.state import SearchState

    s = {**SearchConfig().__dict__, "divisors": {}, "lowest_fraction": {}, "finalists": 0, **search}
    known = ("divisors", "lowest_fraction", "top_k", "finalists", "distill_tokens", "seq_len", "batch_size",
             "memory_dtype", "latency_repeats")
    unknown = sorted(set(search) - set(known))
    if unknown:
        raise ConfigError(f"search: unknown key(s) {', '.join(unknown)} for prune(), which ranks by KL (the Pareto "
                          f"search is the CLI's search.objectives). Known: {', '.join(known)}.")
    fractions = {**SearchConfig().lowest_fraction.__dict__, **s["lowest_fraction"]}
    adapter = get_adapter(model)
    dims = adapter.dims()
    choices = search_choices(dims, s["divisors"], fractions, prefix="search.")
    meter = None
    if constraints.get("latency") is not None:
        meter = LatencyMeter(model, adapter, s["batch_size"], s["seq_len"] or seq_len, s["latency_repeats"], None)
    space = SearchSpace(adapter.cost_model(), dims, choices, s["seq_len"] or seq_len, s["batch_size"],
                        s["memory_dtype"], latency=meter)
    if depth_method == "contiguous" and len(choices["num_layers"]) > 1:
        raise ConfigError("depth_method='contiguous' scores one block size; the search tries several depths. Use "
                          "drop_one or block_importance (or search={'lowest_fraction': {'num_layers': 1}}).")
    if not 0 <= s["finalists"] <= s["top_k"]:
        raise ConfigError(f"search={{'finalists': {s['finalists']}}} must lie in [0, top_k={s['top_k']}].")
    if s["finalists"] and distill_data is None:
        raise ConfigError(f"search={{'finalists': {s['finalists']}}} distils each finalist before the final ranking; "
                          "pass distill_data= (packed token windows, e.g. a LongTensor (N, S)) or finalists=0.")
    settings = _distill_settings(distill) if s["finalists"] else None  # a bad key fails before any work
    profile = space.profile(constraints, prefix="constraints.")
    profile.check()
    if scores is None:
        if calib_data is None:
            raise ConfigError("prune() needs calib_data (or scores from compute_scores).")
        scores = compute_scores(model, calib_data, tokenizer, export_config={"num_layers": choices["num_layers"][0]},
                                importance="activation", depth_method=depth_method, depth_metric=depth_metric,
                                depth_samples=depth_samples, seq_len=seq_len, batch_size=batch_size, seed=seed)
    heldout = as_batches(heldout_data if heldout_data is not None else calib_data, tokenizer, seq_len, batch_size)
    if len(heldout) < 2:
        raise ConfigError("the search scores on two halves of the held-out batches; pass at least 2 batches.")
    half_a, half_b = heldout[: len(heldout) // 2], heldout[len(heldout) // 2:]
    space.layers_for = lambda keep: choose_layers(scores, dims["num_layers"], keep, depth_method, depth_metric)["kept"]
    teacher = HeldoutTeacher(model)  # one teacher pass over the held-out batches for all candidates

    def plan_for(target: dict) -> PruningPlan:
        return make_plan(adapter.family, scores, dims, target, depth_method, depth_metric, rescale_norms,
                         layer_types=getattr(adapter, "layer_types", None))

    def score(c) -> dict:
        student = get_adapter(model).apply(plan_for(c.target))
        return combined(evaluate(student, half_a, teacher=teacher), evaluate(student, half_b, teacher=teacher))

    score_distilled = score
    if s["finalists"]:
        score_distilled = _finalist_scorer(model, plan_for, distill_data, settings, tokenizer, seq_len, batch_size,
                                           s["distill_tokens"], half_a, half_b, seed)
    candidates = space.candidates(profile.bounds)
    if not candidates:
        raise ConfigError("no candidate of the search grid fits every constraint; raise them or refine the divisors.")
    result = rank(candidates, s["top_k"], s["finalists"], SearchState.load(None, ""), score, score_distilled)
    chosen = result.pop("pick")
    plan = plan_for(chosen.target)
    plan.summary["search"] = {**result, "pick": chosen.key, "pick_costs": chosen.costs, "bounds": profile.bounds,
                              "latency_measured": meter.measured if meter else 0}
    return get_adapter(model).apply(plan), plan


def _distill_settings(distill: dict):
    """distill.* of the recipe schema with `distill` over its defaults; an unknown key or a wrong type is named."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from llmprune.config.schema import DistillConfig

    try:
        return OmegaConf.merge(OmegaConf.structured(DistillConfig), distill)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"distill={distill}: {reason}; the keys are the recipe's distill.* (python -m llmprune "
                          "--help).") from None


def _finalist_scorer(model, plan_for, distill_data, settings, tokenizer, seq_len: int, batch_size: int,
                     tokens: int, half_a, half_b, seed: int):
    """candidate -> its score after distilling it for `tokens` tokens of `distill_data` with distill.* `settings`,
    in a temporary folder (the checkpoints are not kept)."""
    import tempfile
    from pathlib import Path

    from llmprune.evaluate import evaluate
    from llmprune.search.rank import combined
    from llmprune.search.stage import short_distill
    from llmprune.stages.distillation import distill_student

    batches = as_batches(distill_data, tokenizer, seq_len, batch_size)
    if any(b.attention_mask is not None and not bool(b.attention_mask.all()) for b in batches):
        raise ConfigError("distill_data holds padding; pass packed token windows (a LongTensor (N, S) of token ids).")
    windows = torch.cat([b.input_ids for b in batches])  # (N, S)

    def score(c) -> dict:
        plan = plan_for(c.target)
        student_adapter = get_adapter(model)
        student = student_adapter.apply(plan)
        d = short_distill(settings, tokens, windows.shape[1])
        with tempfile.TemporaryDirectory() as folder:
            history = distill_student(d, seed, student, student_adapter, model, plan, windows, half_a, Path(folder),
                                      plan.fingerprint())
        last = history[-1]
        a = {"kl_to_teacher": last["eval_kl"], "perplexity": last["eval_perplexity"]}
        return {**combined(a, evaluate(student, half_b, teacher=model)), "tokens": last["tokens"]}

    return score
