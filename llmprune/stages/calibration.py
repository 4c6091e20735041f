"""The calibrate stage: importance scores, cached in importance.safetensors under a fingerprint of everything
they depend on, so re-targeting the same model skips calibration."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from llmprune import data as text
from llmprune.distributed import data_shard, is_rank_zero, world_size
from llmprune.errors import InputFileError
from llmprune.files import load_safetensors, safetensors_metadata
from llmprune.importance import unit_scores
from llmprune.importance.depth import removal_scores

log = logging.getLogger("llmprune")


def depth_needs(depth: DictConfig, dims: dict, target: dict) -> dict:
    """Which removal scores the plan will read (none unless layers are removed, or for block_importance)."""
    drop = dims["num_layers"] - target["num_layers"]
    if drop == 0 or depth.method == "block_importance" or depth.drop_layers:
        return {"drop_one": False, "block_sizes": ()}
    return {"drop_one": depth.method == "drop_one", "block_sizes": (drop,) if depth.method == "contiguous" else ()}


def token_digest(*windows: torch.Tensor) -> str:
    """A hash of token windows: what the text really was, whatever the config says (a file edited in place, a
    de-duplicated embedded text, a corpus that fell back)."""
    digest = hashlib.sha256()
    for ids in windows:
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def calibration_fingerprint(cfg: DictConfig, source, splits) -> str:
    """Everything the scores depend on (model, data settings and the tokens themselves, scoring settings, backend,
    teacher correction); a change re-runs calibration. The training windows count too: the distillation and teacher
    correction checkpoints build on this fingerprint. Streaming computes the same scores, so it is not part of it."""
    keys = {"model": [source.location, source.gguf_file, cfg.model.dtype], "data": OmegaConf.to_container(cfg.data),
            "tokens": token_digest(splits.calib, splits.train, splits.heldout),
            "importance": cfg.prune.importance, "depth": OmegaConf.to_container(cfg.prune.depth), "seed": cfg.seed,
            "world_size": world_size()}
    if cfg.backend != "hf":  # another implementation (and its tensor-parallel split) computes the scores
        keys["backend"] = {"backend": cfg.backend, **OmegaConf.to_container(cfg.megatron)}
    if cfg.distill.teacher_correction_steps:  # the scores (and the correction checkpoint) come from this teacher
        keys["teacher_correction"] = {k: cfg.distill[k] for k in (
            "teacher_correction_steps", "teacher_correction_lr", "micro_batch_size", "global_batch_size",
            "min_lr_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "precision")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def cached_scores(path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The scores in `path` when they were made with `fingerprint`, else {}.

    The file is a cache of what calibration computes from the run's inputs: a damaged one (truncated, overwritten)
    is reported by name and computed again, which is what deleting it by hand would do.
    """
    if not path.exists():
        return {}
    try:
        if safetensors_metadata(path, "").get("fingerprint") != fingerprint:
            return {}
        scores = load_safetensors(path, "")
    except InputFileError as err:
        log.warning(f"importance: {str(err).rstrip('; ')}; computing the scores again (the file will be replaced)")
        return {}
    log.info(f"importance: reusing {path} (same model, data and scoring settings)")
    return scores


def save_scores(scores: dict[str, torch.Tensor], path: Path, fingerprint: str) -> None:
    if is_rank_zero():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"fingerprint": fingerprint})
        tmp.replace(path)


def missing_depth(scores: dict, needs: dict, metric: str) -> tuple[bool, tuple[int, ...]]:
    """(drop-one scores missing, block sizes whose contiguous scores are missing)."""
    blocks = tuple(k for k in needs["block_sizes"] if f"depth.contiguous.{metric}.n{k}" not in scores)
    return needs["drop_one"] and f"depth.drop_one.{metric}" not in scores, blocks


def calibrate(prune: DictConfig, batch_size: int, seed: int, model, adapter, calib: torch.Tensor, needs: dict,
              path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Importance scores of the model in memory (every torchrun replica scores its share of `calib`)."""
    scores = cached_scores(path, fingerprint)
    index, count = data_shard(adapter)  # torchrun: each model replica scores its share; sums are all-reduced
    if "hidden" not in scores:
        batches = text.to_batches(calib[index::count], batch_size)
        scores = unit_scores(prune.mode, prune.importance, model, adapter, batches, seed)
    drop_one, blocks = missing_depth(scores, needs, prune.depth.metric)
    if drop_one or blocks:
        depth_batches = text.to_batches(calib[: prune.depth.num_samples][index::count], batch_size)
        scores.update(removal_scores(model, adapter, depth_batches, metric=prune.depth.metric, drop_one=drop_one,
                                     block_sizes=blocks, total=len(depth_batches)))
    save_scores(scores, path, fingerprint)
    return scores


def calibrate_streaming(prune: DictConfig, batch_size: int, stream, calib: torch.Tensor, needs: dict, path: Path,
                        fingerprint: str) -> dict[str, torch.Tensor]:
    """The same scores with the checkpoint's layers loaded one at a time (see importance/streaming.py)."""
    from llmprune.importance.streaming import streaming_scores

    scores = cached_scores(path, fingerprint)
    drop_one, blocks = missing_depth(scores, needs, prune.depth.metric)
    if "hidden" not in scores or drop_one or blocks:
        depth = text.to_batches(calib[: prune.depth.num_samples], batch_size) if drop_one or blocks else []
        scores = streaming_scores(stream, text.to_batches(calib, batch_size), depth, prune.depth.metric, drop_one,
                                  blocks)
    save_scores(scores, path, fingerprint)
    return scores
