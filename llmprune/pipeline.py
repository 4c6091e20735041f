"""One run, read top to bottom: load -> data -> [correct teacher] -> [convert] -> calibrate -> [search] -> plan ->
prune -> evaluate -> export pruned/ -> [distill -> export final/] -> [push] -> report.

backend=megatron converts the teacher to a megatron-core GPTModel (split over tensor-parallel ranks and pipeline
stages) for calibration and pruning; the pruned model comes back as a Hugging Face student on every rank, so every
later stage is the same for both.

Every stage writes its artifact into `output_dir`; calibration is skipped when importance.safetensors was made
from the same model, data and scoring settings, so re-pruning to another target costs seconds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmprune import data as text
from llmprune.adapters import get_adapter
from llmprune.backends.megatron.convert import check_convertible
from llmprune.distill.cache import build_teacher_cache, visited_windows
from llmprune.distributed import barrier, is_rank_zero, rank, world_size
from llmprune.errors import ConfigError, CorpusUnreachable
from llmprune.evaluate import evaluate
from llmprune.export.hf import check_exportable, push_to_hub
from llmprune.files import make_output_dir
from llmprune.harness import check_lm_eval, lm_eval_tasks, run_lm_eval
from llmprune.importance.activation import summarize
from llmprune.models import choose_streaming, load_model, resolve_source
from llmprune.plan import PruningPlan, make_plan, resolve_targets
from llmprune.plan.plan import with_drop_layers
from llmprune.progress import setup_logging
from llmprune.report import plot_curves, write_report
from llmprune.search.stage import Scorers, is_search, run_search, search_depth_needs, search_fingerprint, search_space
from llmprune.stages.calibration import calibrate, calibrate_streaming, calibration_fingerprint, depth_needs
from llmprune.stages.distillation import distill_student, distill_summary
from llmprune.stages.export import export_stage, export_streaming
from llmprune.stages.teacher import correct_teacher

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


def check_targets(cfg: DictConfig, adapter) -> dict[str, int]:
    """The resolved targets; fails before any work when they are invalid or no stock config can express them."""
    dims = adapter.dims()
    targets = with_drop_layers(OmegaConf.to_container(cfg.prune.export_config), cfg.prune.depth.drop_layers,
                               dims["num_layers"])
    target = resolve_targets(dims, targets, family=adapter.family)
    check_exportable(adapter, target, cfg.export.architecture)
    return target


def load_data(data: DictConfig, tokenizer, seed: int) -> text.TextSplits:
    """Calibration, training and held-out token windows from the configured text. With data.fallback=embedded an
    unreachable corpus gives way to the embedded text, and data.source says so from then on (the calibration
    fingerprint, config-derived, then names the text really used)."""
    render = None
    if data.chat_template:
        render = partial(tokenizer.apply_chat_template, tokenize=False)
    fell_back = False
    try:
        docs = text.load_documents(data.source, data.paths, data.dataset, data.dataset_config, data.split,
                                   data.text_field, data.max_documents, OmegaConf.to_container(data.mix), render)
    except CorpusUnreachable as err:
        if data.fallback != "embedded":
            raise
        log.warning(f"data: the corpus could not be read, so calibration, distillation and evaluation use the "
                    f"embedded text instead (data.fallback=embedded). {err} Scores from the embedded text suit a "
                    "demonstration, not an 8B model: reach the corpus (network, or a local copy via data.mix "
                    "dataset=/path) and run again.")
        data.source, fell_back = "embedded", True
        docs = text.embedded_documents()
    stream = text.token_stream(docs, tokenizer)
    fits = int(len(stream) * (1 - data.eval_fraction)) // data.seq_len
    if fell_back and fits < data.num_samples:
        # sized for the corpus it could not reach: calibrate on what the embedded text holds
        log.warning(f"data: the embedded text holds {fits} calibration samples of {data.seq_len} tokens; "
                    f"calibrating on {fits} instead of data.num_samples={data.num_samples}.")
        data.num_samples = fits
    return text.split_stream(stream, data.seq_len, data.num_samples, data.eval_samples, data.eval_fraction, seed)


def plan_stage(prune: DictConfig, family: str, scores: dict, dims: dict, adapter, run_dir: Path) -> PruningPlan:
    """The plan from the scores, written to plan.json."""
    plan = make_plan(family, scores, dims, OmegaConf.to_container(prune.export_config), prune.depth.method,
                     prune.depth.metric, prune.rescale_norms, drop_layers=prune.depth.drop_layers,
                     layer_types=getattr(adapter, "layer_types", None))  # hybrids: report removed layer types
    plan.summary["importance"] = summarize(scores)
    write_text_atomic(run_dir / "plan.json", plan.to_json())
    barrier()
    return plan


def lm_eval_stage(cfg: DictConfig, name: str, model, tokenizer, tasks: list[Path], report: dict, t: Timings) -> None:
    """eval.lm_eval.tasks on `model` (teacher, pruned or final) into report["lm_eval"][name]; rank zero scores while
    the other ranks wait (the model is whole on every rank here)."""
    if not cfg.eval.lm_eval.tasks or name not in cfg.eval.lm_eval.models:
        return
    with t.stage(f"lm_eval_{name}"):
        if is_rank_zero():
            report.setdefault("lm_eval", {})[name] = run_lm_eval(model, tokenizer, cfg.eval.lm_eval, tasks, cfg.seed)
        barrier()


def base_report(cfg: DictConfig, source, adapter, plan: PruningPlan, params: dict, splits, evaluation: dict,
                t: Timings) -> dict:
    return {
        "recipe": cfg.recipe, "output_dir": cfg.output_dir, "model": source.description, "family": adapter.family,
        "backend": cfg.backend, "model_type": adapter.config.model_type, "importance": cfg.prune.importance,
        "original": plan.original, "target": plan.target, "params": params,
        "removed_layers": plan.depth.get("removed", []), "depth": plan.depth, "plan_summary": plan.summary,
        "data": {"source": cfg.data.source, "stream_tokens": splits.stream_tokens,
                 "calibration_tokens": splits.calib.numel(), "heldout_tokens": splits.heldout.numel()},
        "eval": evaluation, "distill": {"status": "skipped (distill.max_steps=0)"}, "timings_s": t,
    }


def run(cfg: DictConfig) -> dict:
    """Run a composed, validated config end to end. Returns the report (also written to output_dir)."""
    setup_logging()
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if is_rank_zero():
        make_output_dir(run_dir)  # an output_dir that is a file or not writable fails here, by name
    barrier()
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t = Timings()

    source = resolve_source(cfg.model.path, cfg.model.gguf_file)
    if cfg.prune.mode == "gradnas":
        return run_gradnas(cfg, run_dir, t)
    if choose_streaming(cfg.model, source, cfg):
        if is_search(cfg):
            raise ConfigError("the architecture search (prune.constraints with prune.mode=minitron) scores pruned "
                              "models in memory but this checkpoint would be streamed; set model.streaming=false.")
        return run_streaming(cfg, source, run_dir, t)

    with t.stage("load"):
        teacher, tokenizer, source = load_model(cfg.model.path, cfg.model.gguf_file, cfg.model.dtype, cfg.model.device)
        teacher.requires_grad_(False)
        adapter = get_adapter(teacher)
        dims = adapter.dims()
        target = check_targets(cfg, adapter)
        check_lm_eval(cfg.eval.lm_eval)
        if cfg.backend == "megatron":  # fail before calibrating: the model converts, the targets split over TP
            check_convertible(teacher.config, cfg.megatron.tensor_parallel_size, target,
                              cfg.megatron.pipeline_parallel_size)
        space = search_space(cfg, teacher, adapter, run_dir) if is_search(cfg) else None
        if space is not None:  # an unreachable budget stops here, with the achievable range
            profile = space.profile(OmegaConf.to_container(cfg.prune.constraints))
            if is_rank_zero():
                profile.print()
            profile.check()

    with t.stage("data"):
        splits = load_data(cfg.data, tokenizer, cfg.seed)
        heldout = text.to_batches(even_share(splits.heldout), cfg.data.batch_size)
        device = next(teacher.parameters()).device
        tasks = lm_eval_tasks(cfg.eval.lm_eval, splits.heldout, tokenizer, run_dir, cfg.seed)

    fingerprint = calibration_fingerprint(cfg, source, splits)
    if cfg.distill.teacher_correction_steps:
        with t.stage("correct_teacher"):
            correct_teacher(cfg.distill, cfg.seed, teacher, adapter, splits.train, run_dir, fingerprint)

    model, scorer = teacher, adapter  # what calibration and pruning run on
    if cfg.backend == "megatron":
        with t.stage("convert"):
            model, scorer = megatron_model(cfg, teacher)

    with t.stage("calibrate"):
        needs = search_depth_needs(cfg.prune.depth, dims, space) if space else depth_needs(cfg.prune.depth, dims,
                                                                                           target)
        scores = calibrate(cfg.prune, cfg.data.batch_size, cfg.seed, model, scorer, splits.calib, needs,
                           run_dir / "importance.safetensors", fingerprint)

    prune_cfg, found = cfg.prune, None
    if space is not None:
        with t.stage("search"):
            scorers = Scorers(cfg, teacher, adapter, scores, splits.heldout, splits.train, run_dir,
                              search_fingerprint(cfg, fingerprint))
            found = run_search(cfg, space, profile, scorers, run_dir)
            prune_cfg = OmegaConf.merge(cfg.prune, {"export_config": found["target"]})

    with t.stage("plan"):
        plan = plan_stage(prune_cfg, scorer.family, scores, dims, adapter, run_dir)

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

    report = base_report(cfg, source, adapter, plan, params, splits, evaluation, t)
    if found is not None:
        report["search"] = found
    lm_eval_stage(cfg, "teacher", teacher, tokenizer, tasks, report, t)
    lm_eval_stage(cfg, "pruned", student, tokenizer, tasks, report, t)
    probe = splits.heldout[:1].to(device)
    with t.stage("export_pruned"):
        report["architecture_written"] = export_stage("pruned", student, student_adapter, tokenizer, run_dir,
                                                      cfg.export, report, probe)

    if cfg.distill.max_steps > 0:
        if cfg.distill.teacher_cache:
            with t.stage("teacher_cache"):
                visited = visited_windows(splits.train, cfg.distill, cfg.seed)  # those distillation will read
                teacher = build_teacher_cache(teacher, visited, cfg.distill, run_dir / "teacher_cache")
                adapter = space = scorers = None  # they hold the teacher model too; from here on it is its cache
                gc.collect()  # the teacher's modules in reference cycles go only with a collection
        with t.stage("distill"):
            distill_fingerprint = hashlib.sha256(json.dumps(
                [fingerprint, plan.fingerprint(), OmegaConf.to_container(cfg.distill)]).encode()).hexdigest()[:16]
            history = distill_student(cfg.distill, cfg.seed, student, student_adapter, teacher, plan, splits.train,
                                      heldout, run_dir, distill_fingerprint)
        report["distill"] = distill_summary(history, cfg.distill, t["distill"])
        if cfg.distill.teacher_cache:
            report["distill"]["teacher_cache"] = teacher.summary
        if cfg.eval.enabled:
            last = history[-1]  # eval_kl is None with the teacher cache: no teacher to compare with
            evaluation["final"] = {"perplexity": last["eval_perplexity"], "kl_to_teacher": last["eval_kl"]}
        lm_eval_stage(cfg, "final", student, tokenizer, tasks, report, t)
        with t.stage("export_final"):
            report["architecture_written"] = export_stage("final", student, student_adapter, tokenizer, run_dir,
                                                          cfg.export, report, probe)
        if is_rank_zero():
            plot_curves(history, run_dir / "curves.png", evaluation.get("pruned"))
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


def run_streaming(cfg: DictConfig, source, run_dir: Path, t: Timings) -> dict:
    """The same run for a checkpoint larger than memory: layers are loaded one at a time for calibration and
    evaluation, and pruned/ is written tensor by tensor from the source shards (no distillation: it needs the
    model in memory)."""
    from transformers import AutoTokenizer

    from llmprune.importance.streaming import LayerStream, streaming_evaluate, streaming_hidden
    from llmprune.models import DTYPES

    if world_size() > 1:
        raise ConfigError("model.streaming runs in one process; start it without torchrun (or model.streaming=false).")
    dtype = None if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    with t.stage("load"):
        stream = LayerStream(source.location, dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        adapter = stream.adapter
        dims = adapter.dims()
        target = check_targets(cfg, adapter)
        log.info(f"streaming: {stream.checkpoint.nbytes() / 1e9:.2f} GB of safetensors, one layer at a time")

    with t.stage("data"):
        splits = load_data(cfg.data, tokenizer, cfg.seed)
        heldout = text.to_batches(splits.heldout, cfg.data.batch_size)

    fingerprint = calibration_fingerprint(cfg, source, splits)
    with t.stage("calibrate"):
        scores = calibrate_streaming(cfg.prune, cfg.data.batch_size, stream, splits.calib,
                                     depth_needs(cfg.prune.depth, dims, target), run_dir / "importance.safetensors",
                                     fingerprint)

    with t.stage("plan"):
        plan = plan_stage(cfg.prune, adapter.family, scores, dims, adapter, run_dir)
        cost = adapter.cost_model()
        after = cost.params(plan.target, plan.kept_layers)
        params = {"before": cost.params(), "after": after, "after_analytic": after}

    report = base_report(cfg, source, adapter, plan, params, splits, {}, t)
    report["streaming"] = {"checkpoint_bytes": stream.checkpoint.nbytes()}
    with t.stage("export_pruned"):
        written = export_streaming("pruned", stream, plan, run_dir, cfg.export, report, dtype)
        pruned = LayerStream(run_dir / "pruned", dtype)  # stock config + the written shards, checked by name
        report["streaming"]["written"] = written
        written_params = sum(math.prod(s) for s in pruned.checkpoint.shapes().values())
        assert written_params == params["after_analytic"], (written_params, params)

    if cfg.eval.enabled:
        with t.stage("evaluate_pruned"):
            teacher_hidden = streaming_hidden(stream, heldout)
            teacher_eval = streaming_evaluate(stream, heldout, teacher_hidden)
            pruned_eval = streaming_evaluate(pruned, heldout, streaming_hidden(pruned, heldout),
                                             teacher=(stream, teacher_hidden))
            report["eval"] = {"teacher": teacher_eval, "pruned": pruned_eval}

    report["timings_s"] = dict(t)
    write_report(run_dir, report)
    return report


def run_gradnas(cfg: DictConfig, run_dir: Path, t: Timings) -> dict:
    """prune.mode=gradnas: profile the per-layer search space against prune.constraints (stops before any gradient
    when a bound cannot be met), score heads and neurons by gradients, choose per-layer widths, build the model with
    its real per-layer shapes, evaluate, distill, and export a stock-loadable directory (+ ONNX for encoders)."""
    from llmprune.distill.train import Student, distill_loss, train
    from llmprune.export.encoder import physically_pruned
    from llmprune.plan.gradnas import GradNASSpace, gradnas_plan
    from llmprune.stages.gradnas import (
        encoder_distill_loss,
        evaluate_encoder,
        export_gradnas,
        is_encoder,
        resolve_gradnas_loss,
        score_stage,
    )

    g = cfg.prune.gradnas
    with t.stage("load"):
        teacher, tokenizer, source = load_model(cfg.model.path, cfg.model.gguf_file, cfg.model.dtype, cfg.model.device)
        teacher.requires_grad_(False)
        loss = resolve_gradnas_loss(g.loss, teacher)
        adapter = get_adapter(teacher)
        space = GradNASSpace(adapter.cost_model(), adapter.dims(), g.seq_len or cfg.data.seq_len, g.head_step,
                             g.neuron_step)
        profile = space.profile(OmegaConf.to_container(cfg.prune.constraints))
        if is_rank_zero():
            profile.print()
        profile.check()
        encoder = is_encoder(teacher)

    with t.stage("data"):
        splits = load_data(cfg.data, tokenizer, cfg.seed)

    fingerprint = hashlib.sha256(json.dumps([calibration_fingerprint(cfg, source, splits), loss]).encode()
                                 ).hexdigest()[:16]
    with t.stage("calibrate"):
        scores = score_stage(g, loss, cfg.data.batch_size, cfg.seed, teacher, tokenizer, splits.calib,
                             run_dir / "importance.safetensors", fingerprint)

    with t.stage("plan"):
        plan = gradnas_plan(adapter.family, space, scores, profile.bounds, g.rule)
        plan.summary["gradnas"]["loss"] = loss
        write_text_atomic(run_dir / "plan.json", plan.to_json())

    with t.stage("prune"):
        student = physically_pruned(teacher, plan.heads, plan.ffn)
        effective = plan.summary["gradnas"]["effective"]
        params = {"before": real_param_count(teacher), "after": real_param_count(student),
                  "after_analytic": effective["params"]}
        assert params["after"] == params["after_analytic"], params

    def judge(model, reference=None) -> dict:
        if encoder:
            return evaluate_encoder(model, splits.heldout, tokenizer, cfg.data.batch_size, reference)
        return evaluate(model, text.to_batches(splits.heldout, cfg.data.batch_size), teacher=reference)

    evaluation = {}
    if cfg.eval.enabled:
        with t.stage("evaluate_pruned"):
            evaluation = {"teacher": judge(teacher), "pruned": judge(student, teacher)}

    report = base_report(cfg, source, adapter, plan, params, splits, evaluation, t)
    report["importance"] = f"gradnas ({loss} loss, {g.rule} rule)"
    report["gradnas"] = {**plan.summary["gradnas"], "profile": profile.markdown(),
                         "flops": {"before": space.full()["flops"], "after": effective["flops"]},
                         # what the stock config written holds: every head slot and the widest layer's FFN
                         "physical": {"params": space.cost.params(plan.target),
                                      "flops": space.cost.flops(space.seq_len, plan.target)}}
    is_st = not source.gguf_file and (Path(source.location) / "modules.json").exists()
    source_dir = source.location if is_st else None  # a sentence-transformers model keeps its pooling files
    with t.stage("export_pruned"):
        export_gradnas("pruned", teacher, student, adapter.pruning_map(), plan, tokenizer, source_dir, run_dir, report)

    if cfg.distill.max_steps > 0:
        d = cfg.distill
        with t.stage("distill"):
            student.requires_grad_(True)
            if encoder:
                module, compute = student, encoder_distill_loss(teacher, tokenizer, d.hidden_loss, d.hidden_weight)
            else:
                pairs = tuple(range(len(adapter.layers))) if d.hidden_weight else ()  # every layer is kept
                module, compute = Student(student, None, pairs), distill_loss(teacher, d, pairs)
            distill_fingerprint = hashlib.sha256(json.dumps(
                [fingerprint, plan.fingerprint(), OmegaConf.to_container(d)]).encode()).hexdigest()[:16]

            def evaluate_fn(trained) -> dict:
                result = judge(student, teacher)
                if encoder:
                    return {f"eval_{k}": v for k, v in result.items()}
                return {"eval_perplexity": result["perplexity"], "eval_kl": result["kl_to_teacher"]}

            history = train(module, splits.train, compute, d, run_dir, "distill", distill_fingerprint, evaluate_fn,
                            seed=cfg.seed)
            student.requires_grad_(False)
        report["distill"] = distill_summary(history, d, t["distill"])
        if cfg.eval.enabled:
            evaluation["final"] = judge(student, teacher)
        with t.stage("export_final"):
            export_gradnas("final", teacher, student, adapter.pruning_map(), plan, tokenizer, source_dir, run_dir,
                           report)

    report["timings_s"] = dict(t)
    if is_rank_zero():
        write_report(run_dir, report)
    return report
