"""One run, read top to bottom: load -> data -> [correct teacher] -> [convert] -> calibrate -> plan -> prune ->
evaluate -> export pruned/ -> [distill -> export final/] -> [push] -> report.

backend=megatron converts the teacher to a megatron-core GPTModel (split over tensor-parallel ranks and pipeline
stages) for calibration and pruning; the pruned model comes back as a Hugging Face student on every rank, so every
later stage is the same for both.

Every stage writes its artifact into `output_dir`; calibration is skipped when importance.safetensors was made
from the same model, data and scoring settings, so re-pruning to another target costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.backends.megatron.convert import check_convertible
from llmprune.config import ConfigError
from llmprune.distill import Student, distill_loss, lm_only_loss, train
from llmprune.distributed import barrier, data_shard, is_rank_zero, rank, world_size
from llmprune.evaluate import evaluate
from llmprune.export.hf import check_exportable, exportable_model, push_to_hub, save_hf, verify_export
from llmprune.importance.activation import activation_scores, summarize
from llmprune.importance.baselines import baseline_scores
from llmprune.importance.depth import removal_scores
from llmprune.losses import channel_projection
from llmprune.models import load_model
from llmprune.plan import PruningPlan, make_plan, resolve_targets
from llmprune.progress import setup_logging
from llmprune.report import model_card, plot_curves, write_report

log = logging.getLogger("llmprune")


class Timings(dict):
    """Seconds per stage, in order."""

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info(f"stage: {name}")
        yield
        self[name] = round(time.perf_counter() - start, 2)


def write_text_atomic(path: Path, content: str) -> None:
    """Write via a temporary file and one rename (rank zero only), so a killed run never leaves half a file."""
    if not is_rank_zero():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)


def even_share(samples: torch.Tensor) -> torch.Tensor:
    """This rank's share of `samples`, the same count on every rank: an FSDP forward is collective, so every rank
    must run as many batches (a remainder of fewer than world_size samples is left out)."""
    world = world_size()
    if len(samples) < world:
        raise ConfigError(f"data.eval_samples gives {len(samples)} held-out samples for {world} processes; raise "
                          f"data.eval_samples to at least {world}.")
    return samples[: len(samples) // world * world][rank():: world]


def real_param_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def depth_needs(cfg: DictConfig, dims: dict, target: dict) -> dict:
    """Which removal scores the plan will read (none unless layers are removed, or for block_importance)."""
    drop = dims["num_layers"] - target["num_layers"]
    method = cfg.prune.depth.method
    if drop == 0 or method == "block_importance":
        return {"drop_one": False, "block_sizes": ()}
    return {"drop_one": method == "drop_one", "block_sizes": (drop,) if method == "contiguous" else ()}


def calibration_fingerprint(cfg: DictConfig, source) -> str:
    """Everything activation scores depend on; a change re-runs calibration."""
    keys = {"model": [source.location, source.gguf_file, cfg.model.dtype], "data": OmegaConf.to_container(cfg.data),
            "importance": cfg.prune.importance, "depth": OmegaConf.to_container(cfg.prune.depth), "seed": cfg.seed,
            "world_size": world_size()}
    if cfg.backend != "hf":  # another implementation (and its tensor-parallel split) computes the scores
        keys["backend"] = {"backend": cfg.backend, **OmegaConf.to_container(cfg.megatron)}
    if cfg.distill.teacher_correction_steps:  # the scores (and the correction checkpoint) come from this teacher
        keys["teacher_correction"] = {k: cfg.distill[k] for k in (
            "teacher_correction_steps", "teacher_correction_lr", "micro_batch_size", "global_batch_size",
            "min_lr_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "precision")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def calibrate(cfg: DictConfig, model, adapter, calib: torch.Tensor, needs: dict, path: Path, fingerprint: str):
    """Importance scores: reused from `path` when its fingerprint matches and it has what `needs` asks for."""
    scores: dict[str, torch.Tensor] = {}
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                scores = load_file(str(path))
                log.info(f"importance: reusing {path} (same model, data and scoring settings)")
    index, count = data_shard(adapter)  # torchrun: each model replica scores its share; sums are all-reduced
    shard = calib[index::count]
    batches = text.to_batches(shard, cfg.data.batch_size)
    if "hidden" not in scores:
        if cfg.prune.importance == "activation":
            scores = activation_scores(model, adapter, batches, total=len(batches))
        else:
            scores = baseline_scores(cfg.prune.importance, model, adapter, batches, seed=cfg.seed)
    metric = cfg.prune.depth.metric
    missing_blocks = tuple(k for k in needs["block_sizes"] if f"depth.contiguous.{metric}.n{k}" not in scores)
    missing_drop_one = needs["drop_one"] and f"depth.drop_one.{metric}" not in scores
    if missing_blocks or missing_drop_one:
        depth_batches = text.to_batches(calib[: cfg.prune.depth.num_samples][index::count], cfg.data.batch_size)
        scores.update(removal_scores(model, adapter, depth_batches, metric=metric, drop_one=missing_drop_one,
                                     block_sizes=missing_blocks, total=len(depth_batches)))
    if is_rank_zero():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"fingerprint": fingerprint})
        tmp.replace(path)
    return scores


def unit_names(root: torch.nn.Module, layers) -> tuple[str, ...]:
    """The names of `layers` inside `root`: the FSDP units when distill.strategy=fsdp."""
    names = {id(m): n for n, m in root.named_modules()}
    return tuple(names[id(layer)] for layer in layers)


def megatron_model(cfg: DictConfig, teacher):
    """The teacher as a megatron-core GPTModel split over megatron.tensor_parallel_size ranks and
    megatron.pipeline_parallel_size stages, with its adapter."""
    from llmprune.backends.megatron.adapter import MegatronGPTAdapter

    m = cfg.megatron
    adapter = MegatronGPTAdapter.from_hf(teacher, m.tensor_parallel_size, m.pipeline_parallel_size,
                                         m.transformer_impl, seed=cfg.seed)
    return adapter.model, adapter


def prune_to_hf(teacher, model, adapter, plan: PruningPlan):
    """The pruned student as a Hugging Face model, with its adapter. backend=hf prunes a copy of the teacher;
    backend=megatron prunes the GPTModel, gathers it (every TP shard and pipeline stage) into the teacher's class on
    every rank and releases megatron-core."""
    if model is teacher:
        student_adapter = get_adapter(teacher)  # apply() moves this adapter to the new, pruned model
        return student_adapter.apply(plan), student_adapter
    adapter.apply(plan)
    student = adapter.to_hf(teacher)
    adapter.close()
    return student, get_adapter(student)


def correct_teacher(cfg: DictConfig, teacher, adapter, windows: torch.Tensor, run_dir: Path,
                    fingerprint: str) -> list[dict]:
    """Teacher correction: briefly fine-tune the teacher on the distillation data (arXiv:2408.11796 Sec. 2)."""
    settings = OmegaConf.merge(cfg.distill, {"max_steps": cfg.distill.teacher_correction_steps,
                                             "lr": cfg.distill.teacher_correction_lr})
    for p in teacher.parameters():
        p.requires_grad_(True)
    history = train(teacher, windows, lm_only_loss, settings, run_dir, "correct", fingerprint, seed=cfg.seed + 1,
                    shard_units=unit_names(teacher, adapter.layers))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return history


def distill_student(cfg: DictConfig, student, student_adapter, teacher, plan: PruningPlan, windows: torch.Tensor,
                    heldout, run_dir: Path, fingerprint: str) -> list[dict]:
    """Distill `student` from `teacher` in place; returns the metric rows."""
    d = cfg.distill
    student.requires_grad_(True)  # a deep copy of the frozen teacher
    hidden_layers, projection = (), None
    if d.hidden_weight:
        hidden_layers = tuple(range(len(plan.kept_layers)))  # student layer j came from teacher layer kept_layers[j]
        if plan.hidden is not None:
            projection = channel_projection(plan.target["hidden_size"], plan.original["hidden_size"], plan.hidden)
            projection.to(next(student.parameters()).device)
    if d.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = Student(student, projection, hidden_layers)
    loss = distill_loss(teacher, d, tuple(plan.kept_layers[j] for j in hidden_layers))

    def evaluate_fn(trained: torch.nn.Module) -> dict:
        result = evaluate(trained, heldout, teacher=teacher, desc="evaluate student")
        return {"eval_perplexity": result["perplexity"], "eval_kl": result["kl_to_teacher"]}

    history = train(module, windows, loss, d, run_dir, "distill", fingerprint, evaluate_fn, seed=cfg.seed,
                    shard_units=unit_names(module, student_adapter.layers))
    if d.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    return history


def export_stage(name: str, model, adapter, tokenizer, run_dir: Path, cfg: DictConfig, report: dict,
                 probe: torch.Tensor) -> str:
    """Write run_dir/<name> (rank zero), verify the reload; returns which architecture was written."""
    to_save, architecture = exportable_model(model, adapter, cfg.export.architecture)
    report["architecture_written"] = architecture
    if is_rank_zero():
        save_hf(to_save, tokenizer, run_dir / name, {"README.md": model_card({**report, "stage": name}),
                                                     "pruning_plan.json": (run_dir / "plan.json").read_text()},
                cfg.export.max_shard_size)
        if cfg.export.verify:
            report.setdefault("export_check", {})[name] = verify_export(run_dir / name, model, probe)
    barrier()
    return architecture


def run(cfg: DictConfig) -> dict:
    """Run a composed, validated config end to end. Returns the report (also written to output_dir)."""
    setup_logging()
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t = Timings()

    with t.stage("load"):
        teacher, tokenizer, source = load_model(cfg.model.path, cfg.model.gguf_file, cfg.model.dtype, cfg.model.device)
        teacher.requires_grad_(False)
        adapter = get_adapter(teacher)
        dims = adapter.dims()
        target = resolve_targets(dims, OmegaConf.to_container(cfg.prune.export_config),  # fail before calibrating
                                 family=adapter.family)
        check_exportable(adapter, target, cfg.export.architecture)
        if cfg.backend == "megatron":  # fail before calibrating: the model converts, the targets split over TP
            check_convertible(teacher.config, cfg.megatron.tensor_parallel_size, target,
                              cfg.megatron.pipeline_parallel_size)

    with t.stage("data"):
        docs = text.load_documents(cfg.data.source, cfg.data.paths, cfg.data.dataset, cfg.data.dataset_config,
                                   cfg.data.split, cfg.data.text_field, cfg.data.max_documents)
        splits = text.split_stream(text.token_stream(docs, tokenizer), cfg.data.seq_len, cfg.data.num_samples,
                                   cfg.data.eval_samples, cfg.data.eval_fraction, cfg.seed)
        heldout = text.to_batches(even_share(splits.heldout), cfg.data.batch_size)
        device = next(teacher.parameters()).device

    fingerprint = calibration_fingerprint(cfg, source)
    if cfg.distill.teacher_correction_steps:
        with t.stage("correct_teacher"):
            correct_teacher(cfg, teacher, adapter, splits.train, run_dir, fingerprint)

    model, scorer = teacher, adapter  # what calibration and pruning run on
    if cfg.backend == "megatron":
        with t.stage("convert"):
            model, scorer = megatron_model(cfg, teacher)

    with t.stage("calibrate"):
        scores = calibrate(cfg, model, scorer, splits.calib, depth_needs(cfg, dims, target),
                           run_dir / "importance.safetensors", fingerprint)

    with t.stage("plan"):
        plan = make_plan(scorer.family, scores, dims, OmegaConf.to_container(cfg.prune.export_config),
                         cfg.prune.depth.method, cfg.prune.depth.metric, cfg.prune.rescale_norms,
                         layer_types=getattr(adapter, "layer_types", None))  # hybrids: report removed layer types
        plan.summary["importance"] = summarize(scores)
        write_text_atomic(run_dir / "plan.json", plan.to_json())
        barrier()

    with t.stage("prune"):
        student, student_adapter = prune_to_hf(teacher, model, scorer, plan)
        del model, scorer  # evaluation, export and distillation run on the Hugging Face student
        params = {"before": real_param_count(teacher), "after": real_param_count(student),
                  "after_analytic": student_adapter.count_params()}
        assert params["after"] == params["after_analytic"], params

    evaluation = {}
    if cfg.eval.enabled:
        with t.stage("evaluate_pruned"):
            evaluation = {"teacher": evaluate(teacher, heldout, desc="evaluate teacher"),
                          "pruned": evaluate(student, heldout, teacher=teacher, desc="evaluate pruned")}

    report = {
        "recipe": cfg.recipe, "output_dir": str(run_dir), "model": source.description, "family": adapter.family,
        "backend": cfg.backend,
        "model_type": teacher.config.model_type, "importance": cfg.prune.importance,
        "original": plan.original, "target": plan.target, "params": params,
        "removed_layers": plan.depth.get("removed", []), "depth": plan.depth, "plan_summary": plan.summary,
        "data": {"source": cfg.data.source, "stream_tokens": splits.stream_tokens,
                 "calibration_tokens": splits.calib.numel(), "heldout_tokens": splits.heldout.numel()},
        "eval": evaluation, "distill": {"status": "skipped (distill.max_steps=0)"}, "timings_s": t,
    }
    probe = splits.heldout[:1].to(device)
    with t.stage("export_pruned"):
        report["architecture_written"] = export_stage("pruned", student, student_adapter, tokenizer, run_dir, cfg,
                                                      report, probe)

    if cfg.distill.max_steps > 0:
        with t.stage("distill"):
            distill_fingerprint = hashlib.sha256(json.dumps(
                [fingerprint, plan.fingerprint(), OmegaConf.to_container(cfg.distill)]).encode()).hexdigest()[:16]
            history = distill_student(cfg, student, student_adapter, teacher, plan, splits.train, heldout, run_dir,
                                      distill_fingerprint)
        report["distill"] = distill_summary(history, cfg, t["distill"])
        if cfg.eval.enabled:
            last = history[-1]
            evaluation["final"] = {"perplexity": last["eval_perplexity"], "kl_to_teacher": last["eval_kl"]}
        with t.stage("export_final"):
            report["architecture_written"] = export_stage("final", student, student_adapter, tokenizer, run_dir,
                                                          cfg, report, probe)
        if is_rank_zero():
            plot_curves(history, run_dir / "curves.png", evaluation.get("pruned", {}).get("perplexity"))
            report["distill"]["curves"] = "curves.png"

    if cfg.export.push_to_hub and is_rank_zero():
        with t.stage("push"):
            folder = run_dir / ("final" if cfg.distill.max_steps > 0 else "pruned")
            report["hub"] = push_to_hub(folder, cfg.export.repo_id, cfg.export.private, cfg.export.hub_endpoint,
                                        f"llmprune {cfg.recipe}")

    report["timings_s"] = dict(t)
    if is_rank_zero():
        write_report(run_dir, report)
    return report


def distill_summary(history: list[dict], cfg: DictConfig, seconds: float) -> dict:
    last = history[-1]
    steps_run = [r for r in history if "seconds" in r]
    return {"status": f"{last['step']} steps, {last['tokens']:,} tokens", "steps": last["step"],
            "tokens": last["tokens"], "seconds": seconds,
            "seconds_per_step": round(seconds / max(1, len(steps_run)), 3),
            "final_train_loss": last["loss"], "metrics": "distill_metrics.jsonl",
            "losses": {k: cfg.distill[k] for k in ("kl_weight", "reverse_kl_weight", "topk_weight", "hidden_weight",
                                                    "lm_weight") if cfg.distill[k]}}


def load_plan(run_dir: str | Path) -> PruningPlan:
    return PruningPlan.from_json((Path(run_dir) / "plan.json").read_text())
