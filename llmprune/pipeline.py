"""One run, read top to bottom: load -> data -> calibrate -> plan -> prune -> [distill] -> evaluate -> export -> report.

Every stage writes its artifact into `output_dir`; calibration is skipped when importance.safetensors was made
from the same model, data and scoring settings, so re-pruning to another target costs seconds.
"""

from __future__ import annotations

import copy
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
from llmprune.baselines import baseline_scores
from llmprune.depth import removal_scores
from llmprune.distributed import barrier, is_rank_zero, rank, world_size
from llmprune.evaluate import evaluate
from llmprune.export import exportable_model, save_hf, verify_export
from llmprune.importance import activation_scores, summarize
from llmprune.models import load_model
from llmprune.plan import PruningPlan, make_plan, resolve_targets
from llmprune.progress import setup_logging
from llmprune.report import model_card, write_report

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
    shard = calib[rank():: world_size()]  # torchrun: each rank scores its share; sums are all-reduced
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
        depth_batches = text.to_batches(calib[: cfg.prune.depth.num_samples][rank():: world_size()],
                                        cfg.data.batch_size)
        scores.update(removal_scores(model, adapter, depth_batches, metric=metric, drop_one=missing_drop_one,
                                     block_sizes=missing_blocks, total=len(depth_batches)))
    if is_rank_zero():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"fingerprint": fingerprint})
        tmp.replace(path)
    return scores


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
        adapter = get_adapter(teacher)
        dims = adapter.dims()
        target = resolve_targets(dims, OmegaConf.to_container(cfg.prune.export_config))  # fail before calibrating

    with t.stage("data"):
        docs = text.load_documents(cfg.data.source, cfg.data.paths, cfg.data.dataset, cfg.data.dataset_config,
                                   cfg.data.split, cfg.data.text_field, cfg.data.max_documents)
        splits = text.split_stream(text.token_stream(docs, tokenizer), cfg.data.seq_len, cfg.data.num_samples,
                                   cfg.data.eval_samples, cfg.data.eval_fraction, cfg.seed)
        heldout = text.to_batches(splits.heldout[rank():: world_size()], cfg.data.batch_size)

    with t.stage("calibrate"):
        scores = calibrate(cfg, teacher, adapter, splits.calib, depth_needs(cfg, dims, target),
                           run_dir / "importance.safetensors", calibration_fingerprint(cfg, source))

    with t.stage("plan"):
        plan = make_plan(adapter.family, scores, dims, OmegaConf.to_container(cfg.prune.export_config),
                         cfg.prune.depth.method, cfg.prune.depth.metric,
                         cfg.prune.rescale_norms)
        plan.summary["importance"] = summarize(scores)
        write_text_atomic(run_dir / "plan.json", plan.to_json())

    with t.stage("prune"):
        student = copy.deepcopy(teacher)
        student_adapter = get_adapter(student)
        student_adapter.apply(plan)
        params = {"before": real_param_count(teacher), "after": real_param_count(student),
                  "after_analytic": student_adapter.count_params()}
        assert params["after"] == params["after_analytic"], params

    distill = {"status": "skipped (distill.max_steps=0)"}

    evaluation = {}
    if cfg.eval.enabled:
        with t.stage("evaluate"):
            evaluation = {"teacher": evaluate(teacher, heldout, desc="evaluate teacher"),
                          "pruned": evaluate(student, heldout, teacher=teacher, desc="evaluate pruned")}

    with t.stage("export"):
        to_save, architecture = exportable_model(student, student_adapter, cfg.export.architecture)
        report = {
            "recipe": cfg.recipe, "output_dir": str(run_dir), "model": source.description, "family": adapter.family,
            "model_type": teacher.config.model_type, "architecture_written": architecture,
            "original": plan.original, "target": plan.target, "params": params,
            "removed_layers": plan.depth.get("removed", []), "depth": plan.depth, "plan_summary": plan.summary,
            "data": {"source": cfg.data.source, "stream_tokens": splits.stream_tokens,
                     "calibration_tokens": splits.calib.numel(), "heldout_tokens": splits.heldout.numel()},
            "eval": evaluation, "distill": distill, "timings_s": t,
        }
        if is_rank_zero():
            save_hf(to_save, tokenizer, run_dir / "pruned",
                    {"README.md": model_card(report), "pruning_plan.json": plan.to_json()})
            if cfg.export.verify:
                report["export_check"] = verify_export(run_dir / "pruned", student, splits.heldout[:1].to(
                    next(student.parameters()).device))
        barrier()

    report["timings_s"] = dict(t)
    if is_rank_zero():
        write_report(run_dir, report)
    return report


def load_plan(run_dir: str | Path) -> PruningPlan:
    return PruningPlan.from_json((Path(run_dir) / "plan.json").read_text())
