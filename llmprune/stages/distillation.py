"""The distill stage: the pruned student learns from the teacher (losses and loop in llmprune/distill/)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from llmprune.distill.cache import TeacherCache, cached_distill_loss
from llmprune.distill.losses import channel_projection
from llmprune.distill.train import Student, distill_loss, train
from llmprune.evaluate import evaluate
from llmprune.plan import PruningPlan
from llmprune.pruning.map import residual_scale


def unit_names(root: torch.nn.Module, layers) -> tuple[str, ...]:
    """The names of `layers` inside `root`: the FSDP units when distill.strategy=fsdp."""
    names = {id(m): n for n, m in root.named_modules()}
    return tuple(names[id(layer)] for layer in layers)


def hidden_student(student: torch.nn.Module, plan: PruningPlan, hidden_layers: tuple[int, ...]) -> Student:
    """The student with the outputs of its layers `hidden_layers` (student layer j came from teacher layer
    plan.kept_layers[j]) projected onto the teacher's hidden width: each kept channel back in its place, divided by
    the residual scale of rescaled norms (then a student layer that computes what its teacher layer did starts at
    zero hidden loss)."""
    projection = None
    scale = residual_scale(plan)
    if hidden_layers and (plan.hidden is not None or scale != 1.0):
        projection = channel_projection(plan.target["hidden_size"], plan.original["hidden_size"], plan.hidden,
                                        1.0 / scale)
        projection.to(next(student.parameters()).device)
    return Student(student, projection, hidden_layers)


def distill_student(distill: DictConfig, seed: int, student, student_adapter, teacher: torch.nn.Module | TeacherCache,
                    plan: PruningPlan, windows: torch.Tensor, heldout, run_dir: Path, fingerprint: str) -> list[dict]:
    """Distill `student` from `teacher` in place; returns the metric rows.

    `teacher` is the model, or its top-k logits of `windows` (distill.teacher_cache): then the losses read the
    cache and held-out evaluation measures perplexity only (eval_kl is None), since KL to the teacher needs its
    whole distribution.
    """
    d = distill
    student.requires_grad_(True)  # built from the frozen teacher's tensors
    hidden_layers = tuple(range(len(plan.kept_layers))) if d.hidden_weight else ()
    if d.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = hidden_student(student, plan, hidden_layers)
    cached = isinstance(teacher, TeacherCache)
    if cached:
        loss = cached_distill_loss(teacher, d)
    else:
        loss = distill_loss(teacher, d, tuple(plan.kept_layers[j] for j in hidden_layers))

    def evaluate_fn(trained: torch.nn.Module) -> dict:
        result = evaluate(trained, heldout, teacher=None if cached else teacher, desc="evaluate student")
        return {"eval_perplexity": result["perplexity"], "eval_kl": result.get("kl_to_teacher")}

    history = train(module, windows, loss, d, run_dir, "distill", fingerprint, evaluate_fn, seed=seed,
                    shard_units=unit_names(module, student_adapter.layers))
    if d.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    return history


def distill_summary(history: list[dict], distill: DictConfig, seconds: float) -> dict:
    last = history[-1]
    steps_run = [r for r in history if "seconds" in r]
    return {"status": f"{last['step']} steps, {last['tokens']:,} tokens", "steps": last["step"],
            "tokens": last["tokens"], "seconds": seconds,
            "seconds_per_step": round(seconds / max(1, len(steps_run)), 3),
            "final_train_loss": last["loss"], "metrics": "distill_metrics.jsonl",
            "losses": {k: distill[k] for k in ("kl_weight", "reverse_kl_weight", "topk_weight", "hidden_weight",
                                               "lm_weight") if distill[k]}}
