"""Teacher correction: briefly fine-tune the teacher on the distillation data before scoring and distilling
(Minitron, arXiv:2408.11796 Sec. 2)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmprune.distill.train import lm_only_loss, train
from llmprune.stages.distillation import unit_names


def correct_teacher(distill: DictConfig, seed: int, teacher, adapter, windows: torch.Tensor, run_dir: Path,
                    fingerprint: str) -> list[dict]:
    """Train the teacher in place on the LM loss for distill.teacher_correction_steps; returns the metric rows."""
    settings = OmegaConf.merge(distill, {"max_steps": distill.teacher_correction_steps,
                                         "lr": distill.teacher_correction_lr})
    teacher.requires_grad_(True)
    history = train(teacher, windows, lm_only_loss, settings, run_dir, "correct", fingerprint, seed=seed + 1,
                    shard_units=unit_names(teacher, adapter.layers))
    teacher.requires_grad_(False)
    return history
