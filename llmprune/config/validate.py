"""Checks of values the schema's types cannot express; every problem is listed in one error with its key and fix."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmprune.config.schema import CHOICES
from llmprune.errors import ConfigError
from llmprune.files import MODEL_FIX, read_json


def validate(cfg: DictConfig) -> None:
    """Check values that the schema's types cannot; raise one ConfigError listing every problem."""
    problems = []
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r} is not one of: {', '.join(choices)}.")
    for key, value in cfg.prune.export_config.items():
        if value is not None and value < 1:
            problems.append(f"prune.export_config.{key}={value} must be a positive integer (or null to keep it).")
    positive = ("data.seq_len", "data.num_samples", "data.eval_samples", "data.batch_size", "prune.depth.num_samples")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be at least 1.")
    if not 0 < cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={cfg.data.eval_fraction} must lie strictly between 0 and 1.")
    if cfg.data.source == "files" and not cfg.data.paths:
        problems.append("data.source=files needs data.paths=[a.txt,b.jsonl].")
    for path in cfg.data.paths if cfg.data.source == "files" else ():
        if not os.path.exists(path):
            problems.append(f"data.paths: '{path}' does not exist.")
    if cfg.data.source == "hf" and not cfg.data.dataset and not cfg.data.mix:
        problems.append("data.source=hf needs data.dataset=<datasets name> (or a data.mix of datasets).")
    for i, part in enumerate(cfg.data.mix):
        if not part.dataset or part.weight <= 0:
            problems.append(f"data.mix[{i}] needs a dataset name and a positive weight (got dataset="
                            f"'{part.dataset}', weight={part.weight}).")
    if cfg.distill.max_steps < 0:
        problems.append(f"distill.max_steps={cfg.distill.max_steps} must be 0 or more.")
    d = cfg.distill
    for key in ("micro_batch_size", "global_batch_size", "eval_every", "save_every", "keep_checkpoints"):
        if d[key] < 1:
            problems.append(f"distill.{key}={d[key]} must be at least 1.")
    if d.global_batch_size % max(d.micro_batch_size, 1):
        problems.append(f"distill.global_batch_size={d.global_batch_size} must be a multiple of "
                        f"distill.micro_batch_size={d.micro_batch_size}.")
    weights = ("kl_weight", "reverse_kl_weight", "topk_weight", "hidden_weight", "lm_weight")
    if d.max_steps > 0 and not any(d[w] for w in weights):
        problems.append(f"distill: every loss weight is 0; set one of {', '.join('distill.' + w for w in weights)}.")
    if d.topk_weight and d.topk < 1:
        problems.append(f"distill.topk_weight={d.topk_weight} needs distill.topk=<k> (e.g. 64).")
    if d.lr <= 0 or d.temperature <= 0:
        problems.append("distill.lr and distill.temperature must be positive.")
    if d.teacher_correction_steps < 0:
        problems.append(f"distill.teacher_correction_steps={d.teacher_correction_steps} must be 0 or more.")
    if d.teacher_cache:
        problems += _teacher_cache_problems(cfg)
    if cfg.export.push_to_hub and not cfg.export.repo_id:
        problems.append("export.push_to_hub=true needs export.repo_id=<user or org>/<name>.")
    if not str(cfg.output_dir).strip():
        problems.append("output_dir is empty; set output_dir=<path>.")
    problems += _format_problems(cfg)
    problems += _lm_eval_problems(cfg.eval.lm_eval)
    if cfg.backend == "megatron":
        problems += _megatron_problems(cfg)
    problems += _mode_problems(cfg)
    drop = cfg.prune.depth.drop_layers
    if drop:
        if any(not isinstance(i, int) or i < 0 for i in drop) or len(set(drop)) != len(drop):
            problems.append(f"prune.depth.drop_layers={list(drop)} must be distinct layer indices >= 0.")
        if any(v is not None for v in cfg.prune.constraints.values()):
            problems.append("prune.depth.drop_layers names the layers to remove; it does not combine with "
                            "prune.constraints (the search and GradNAS choose the architecture themselves).")
    if (cfg.prune.importance != "activation" and cfg.prune.depth.method == "block_importance"
            and cfg.prune.export_config.num_layers is not None):
        problems.append(f"prune.depth.method=block_importance reads the activation pass, which "
                        f"prune.importance={cfg.prune.importance} does not run; use prune.depth.method=drop_one or "
                        "contiguous with a baseline importance (or prune.importance=activation).")
    if cfg.model.streaming not in ("auto", True, False):
        problems.append(f"model.streaming={cfg.model.streaming!r} is not one of: auto, true, false.")
    elif cfg.model.streaming is True:
        from llmprune.models import streaming_blockers

        problems += [f"model.streaming=true prunes without loading the model, but {b}." for b in
                     streaming_blockers(cfg)]
    if not 0 < cfg.model.streaming_memory_fraction <= 1:
        problems.append(f"model.streaming_memory_fraction={cfg.model.streaming_memory_fraction} must lie in (0, 1].")
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def _teacher_cache_problems(cfg: DictConfig) -> list[str]:
    """distill.teacher_cache keeps only the teacher's top-k logits: top-k KL must be on, and the losses that need
    the whole teacher (its full distribution, its hidden states) off."""
    d, problems = cfg.distill, []
    if d.topk_weight <= 0 or d.topk < 1:
        problems.append(f"distill.teacher_cache=true stores the teacher's top-k logits and trains on top-k KL; set "
                        f"distill.topk_weight > 0 and distill.topk >= 1 (now {d.topk_weight} and {d.topk}).")
    whole = [f"distill.{k}={d[k]}" for k in ("kl_weight", "reverse_kl_weight", "hidden_weight") if d[k] > 0]
    if whole:
        problems.append(f"distill.teacher_cache=true keeps only the teacher's top-k logits, but {', '.join(whole)} "
                        "need(s) the teacher itself; set them to 0 (or distill.teacher_cache=false).")
    if cfg.prune.mode != "minitron":
        problems.append(f"distill.teacher_cache=true is for prune.mode=minitron (prune.mode={cfg.prune.mode}).")
    return problems


EXPORT_FORMATS = ("hf", "gguf")


def _format_problems(cfg: DictConfig) -> list[str]:
    """export.formats: known names, hf always (the stage directory is the Hugging Face export; gguf adds a file to
    it), gguf for in-memory llama-like models only (the family is known here from a local config.json; otherwise
    export checks it)."""
    formats = list(cfg.export.formats)
    problems = [f"export.formats: '{f}' is not one of: {', '.join(EXPORT_FORMATS)}." for f in formats
                if f not in EXPORT_FORMATS]
    if "hf" not in formats:
        problems.append(f"export.formats={formats} must contain hf (e.g. export.formats=[hf,gguf]).")
    config_json = Path(str(cfg.model.path)).expanduser() / "config.json"
    if "gguf" in formats and config_json.is_file():
        from llmprune.export.gguf import check_gguf_family

        try:
            check_gguf_family(read_json(config_json, MODEL_FIX).get("model_type"))
        except ConfigError as err:
            problems.append(str(err))
    if "gguf" in formats and cfg.model.streaming is True:
        problems.append("export.formats contains gguf, which is written from the model in memory; set "
                        "model.streaming=false (or export.formats=[hf]).")
    return problems


MEGATRON_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _megatron_problems(cfg: DictConfig) -> list[str]:
    """backend=megatron: llama-like models (known here from a local config.json), activation scores, TP/PP >= 1."""
    problems = []
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if cfg.megatron[key] < 1:
            problems.append(f"megatron.{key}={cfg.megatron[key]} must be at least 1.")
    if cfg.prune.importance != "activation":
        problems.append(f"prune.importance={cfg.prune.importance} needs backend=hf; backend=megatron computes "
                        "activation (Minitron) scores only.")
    mamba = [k for k in ("mamba_num_heads", "mamba_head_dim") if cfg.prune.export_config[k] is not None]
    if mamba:
        problems.append(f"prune.export_config.{mamba[0]} is a Mamba target; backend=megatron prunes llama-like GPT "
                        f"models ({', '.join(MEGATRON_FAMILIES)}). Use backend=hf.")
    config_json = Path(str(cfg.model.path)).expanduser() / "config.json"
    if config_json.is_file():
        model_config = read_json(config_json, MODEL_FIX)
        model_type, layers = model_config.get("model_type"), model_config.get("num_hidden_layers")
        if model_type not in MEGATRON_FAMILIES:
            problems.append(f"backend=megatron converts llama-like models ({', '.join(MEGATRON_FAMILIES)}); "
                            f"model.path={cfg.model.path} is a '{model_type}' model. Use backend=hf.")
        elif layers is not None and layers < cfg.megatron.pipeline_parallel_size:
            problems.append(f"megatron.pipeline_parallel_size={cfg.megatron.pipeline_parallel_size} exceeds the "
                            f"model's {layers} layers (each pipeline stage holds at least one); lower it.")
    return problems


def _mode_problems(cfg: DictConfig) -> list[str]:
    """gradnas is driven by prune.constraints; minitron by prune.export_config targets or, searching, by
    prune.constraints: never both."""
    p = cfg.prune
    targets = [f"prune.export_config.{k}" for k, v in p.export_config.items() if v is not None]
    constraints = [f"prune.constraints.{k}" for k, v in p.constraints.items() if v is not None]
    problems = _budget_syntax(p.constraints)
    if p.mode == "minitron":
        if constraints and targets:
            problems.append(f"{', '.join(targets)} together with {', '.join(constraints)}: prune.mode=minitron either "
                            "prunes to the targets or searches the architecture within the constraints; set one of "
                            "them to null.")
        if constraints and cfg.backend != "hf":
            problems.append(f"the architecture search (prune.constraints with prune.mode=minitron) runs on backend=hf "
                            f"(backend={cfg.backend}); give prune.export_config targets instead.")
        if constraints and cfg.model.streaming is True:
            problems.append("the architecture search scores pruned models in memory; set model.streaming=false or give "
                            "prune.export_config targets.")
        return problems + (_search_problems(cfg.search) if constraints else [])
    problems += [f"prune.constraints.{k} is a budget of the Minitron search; prune.mode=gradnas takes params and "
                 "flops." for k in ("memory", "latency") if p.constraints[k] is not None]
    if targets:
        problems.append(f"{', '.join(targets)} together with prune.mode=gradnas: GradNAS chooses per-layer widths "
                        "from prune.constraints; remove the targets (set them to null).")
    if not constraints:
        problems.append('prune.mode=gradnas needs a budget: prune.constraints.flops="60%" or '
                        "prune.constraints.params=3e7.")
    if cfg.backend != "hf":
        problems.append(f"prune.mode=gradnas runs on backend=hf (backend={cfg.backend}).")
    if cfg.model.streaming is True:
        problems.append("prune.mode=gradnas needs the model in memory (gradients); set model.streaming=false.")
    g = p.gradnas
    for key in ("head_step", "neuron_step"):
        if g[key] < 1:
            problems.append(f"prune.gradnas.{key}={g[key]} must be at least 1.")
    if g.seq_len is not None and g.seq_len < 1:
        problems.append(f"prune.gradnas.seq_len={g.seq_len} must be at least 1 (or null: data.seq_len).")
    return problems


def _budget_syntax(constraints: DictConfig) -> list[str]:
    """Budgets that are no number or share (their size is checked against the model once it is loaded)."""
    from llmprune.plan.constraints import parse_constraint

    problems = []
    for key, value in constraints.items():
        if value is not None:
            try:
                parse_constraint(key, value, 1.0)
            except ConfigError as err:
                problems.append(str(err))
    return problems


def _search_problems(search: DictConfig) -> list[str]:
    """The search group's counts, objectives and grids."""
    from llmprune.search.pareto import OBJECTIVES

    problems = [f"search.{k}={search[k]} must be at least 1." for k in
                ("top_k", "batch_size", "latency_repeats", "generations") if search[k] < 1]
    if not 0 <= search.finalists <= search.top_k:
        problems.append(f"search.finalists={search.finalists} must lie in [0, search.top_k={search.top_k}].")
    if search.finalists and search.distill_tokens < 1:
        problems.append(f"search.distill_tokens={search.distill_tokens}: finalists are distilled before the final "
                        "ranking; give a token budget (e.g. 16384) or set search.finalists=0.")
    if search.seq_len is not None and search.seq_len < 1:
        problems.append(f"search.seq_len={search.seq_len} must be at least 1 (or null: data.seq_len).")
    if search.population < 2:
        problems.append(f"search.population={search.population} must be at least 2.")
    objectives = list(search.objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or "kl" not in objectives or len(set(objectives)) != len(objectives):
        problems.append(f"search.objectives={objectives} must list distinct objectives from {', '.join(OBJECTIVES)}, "
                        "kl among them (e.g. [kl] or [kl, latency]).")
    for key, value in search.divisors.items():
        if value is not None and value < 1:
            problems.append(f"search.divisors.{key}={value} must be at least 1 (or null: automatic).")
    for key, value in search.lowest_fraction.items():
        if not 0 < value <= 1:
            problems.append(f"search.lowest_fraction.{key}={value} must lie in (0, 1] (1 keeps the dimension).")
    return problems


def _lm_eval_problems(lm: DictConfig) -> list[str]:
    problems = []
    unknown = [m for m in lm.models if m not in ("teacher", "pruned", "final")]
    if unknown:
        problems.append(f"eval.lm_eval.models={list(lm.models)}: {unknown} not among teacher, pruned, final.")
    for key in ("limit", "batch_size", "max_length"):
        if lm[key] is not None and lm[key] < 1:
            problems.append(f"eval.lm_eval.{key}={lm[key]} must be at least 1 (or null).")
    if lm.num_fewshot is not None and lm.num_fewshot < 0:
        problems.append(f"eval.lm_eval.num_fewshot={lm.num_fewshot} must be 0 or more (or null).")
    if lm.include_path is not None and not os.path.isdir(lm.include_path):
        problems.append(f"eval.lm_eval.include_path: '{lm.include_path}' is not a folder (of task YAML files).")
    return problems
