"""Distillation from cached teacher logits (distill.teacher_cache): the teacher runs once over the training windows,
its top-k logits (values and token indices) go to safetensors shards in <run_dir>/teacher_cache/, and training reads
them instead of running the teacher, which the pipeline then releases from memory.

Top-k KL renormalizes both distributions over the teacher's k tokens (`losses.topk_kl`), so the teacher's k logits
and their indices are all it needs of the teacher: the loss from the cache is the same computation on the same
numbers. Each shard is written whole (tmp + rename), so a killed build resumes at the first missing shard; the
manifest names the windows, the teacher (config and sampled weights), k and the precision the logits were computed
in, and a cache made from anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmprune.distill import losses
from llmprune.distill.losses import output_head
from llmprune.distill.train import SampleOrder, autocast_dtype, logit_loss_parts
from llmprune.distributed import barrier, is_rank_zero, rank, world_size
from llmprune.evaluate import predicting_positions
from llmprune.progress import log, progress

# top-k values + int32 indices per shard; 64 MB keeps a lost shard cheap to recompute and the file count small
# (SmolLM2 at k=64 x 256 tokens: ~500 windows a shard)
SHARD_BYTES = 64 * 2**20
MANIFEST_VERSION = 1


@dataclass
class TeacherCache:
    """The teacher's top-k logits of every training window, held in CPU memory.

    values: (N, S-1, k) the teacher's logits at its top-k tokens, in its logits' dtype (so `.float()` gives back
        exactly the float32 numbers `losses.topk_kl` computes with).
    indices: (N, S-1, k) int32 token ids.
    rows: digest of a window's tokens -> its row: the training loop hands over token ids, not window numbers, and
        a window's teacher logits are a function of its tokens alone.
    summary: what the report shows (size, shards, computed / reused).
    """

    values: torch.Tensor
    indices: torch.Tensor
    rows: dict[bytes, int]
    summary: dict = field(default_factory=dict)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, int64 indices), each (B, S-1, k) on ids' device, of the windows `ids` (B, S)."""
        keys = [window_key(w) for w in ids.cpu()]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        assert not missing, f"batch rows {missing} are not training windows of this cache ({len(self.rows)} windows)"
        rows = torch.tensor([self.rows[k] for k in keys])
        return self.values[rows].to(ids.device), self.indices[rows].to(ids.device, torch.long)


def window_key(window: torch.Tensor) -> bytes:
    """A 16-byte digest of one window's token ids (S,)."""
    return hashlib.blake2b(window.to(torch.int64).numpy().tobytes(), digest_size=16).digest()


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the training windows (N, S): their order and every token."""
    return hashlib.sha256(repr(tuple(windows.shape)).encode() + windows.to(torch.int64).numpy().tobytes()).hexdigest()


def teacher_identity(teacher: nn.Module, samples: int = 64) -> str:
    """sha256 of the teacher's config and `samples` evenly spaced entries of every parameter.

    Hashing every weight of an 8B model would take seconds; a teacher correction or another checkpoint changes
    nearly every entry, so a strided sample of each tensor tells them apart. The config's path and library version
    are left out: the same weights loaded from a copy keep their cache.
    """
    config = {k: v for k, v in teacher.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in teacher.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode() + sample.numpy().tobytes())
    return h.hexdigest()


def visited_windows(windows: torch.Tensor, distill, seed: int) -> torch.Tensor:
    """The windows `distill.train` will read, each once, in first-visit order: the samples of max_steps steps of its
    SampleOrder. The training split is often far larger than a run's token budget (the default recipe reads ~400 of
    its windows), and only these need the teacher."""
    order, seen = SampleOrder(len(windows), seed), {}
    for g in range(distill.max_steps * distill.global_batch_size):
        seen.setdefault(order(g), None)
    return windows[list(seen)]


def shard_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"shard_{index:05d}.safetensors"


def _write_shard(path: Path, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Write one shard through a temporary file and one rename: a shard on disk is always complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"values": values.contiguous(), "indices": indices.contiguous()}, str(tmp))
    tmp.replace(path)


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int, dtype: torch.dtype | None):
    """The teacher's top-k (values in its logits' dtype, int32 indices), each (B, S-1, k), of windows `ids` (B, S),
    under the autocast training would use, so the numbers are those the live teacher would give."""
    autocast = torch.autocast(ids.device.type, dtype=dtype, enabled=dtype is not None)
    with autocast:
        logits = teacher(input_ids=ids, use_cache=False, logits_to_keep=predicting_positions(ids)).logits
    top = logits.float().topk(k, dim=-1)  # as losses.topk_kl selects them
    return top.values.to(logits.dtype), top.indices.to(torch.int32)


def build_teacher_cache(teacher: nn.Module, windows: torch.Tensor, distill, cache_dir: Path,
                        shard_windows: int | None = None) -> TeacherCache:
    """Compute (or reuse) the teacher's top-k logits of every window in `cache_dir`; returns them loaded.

    Args:
        teacher: the teacher, on its device.
        windows: (N, S) the windows to cache (`visited_windows` of the training split).
        distill: DistillConfig (topk, micro_batch_size, precision).
        cache_dir: <run_dir>/teacher_cache.
        shard_windows: windows per shard; None derives it from SHARD_BYTES.

    Under torchrun each process computes every world_size-th shard, and every process loads them all.
    """
    n, seq = windows.shape
    k = distill.topk
    device = next(teacher.parameters()).device
    dtype = autocast_dtype(distill.precision, device)
    value_bytes = (dtype or next(teacher.parameters()).dtype).itemsize
    shard_windows = shard_windows or max(1, SHARD_BYTES // ((seq - 1) * k * (value_bytes + 4)))
    manifest = {"version": MANIFEST_VERSION, "windows": windows_digest(windows), "teacher": teacher_identity(teacher),
                "topk": k, "precision": str(dtype), "shard_windows": shard_windows}
    manifest_path = cache_dir / "manifest.json"
    if is_rank_zero():
        found = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if found != manifest:
            if found is not None:
                changed = [key for key in manifest if found.get(key) != manifest[key]]
                log.warning(f"teacher_cache: {cache_dir} was made from other {', '.join(changed)}; rebuilding it")
            shutil.rmtree(cache_dir, ignore_errors=True)
            cache_dir.mkdir(parents=True)
            tmp = manifest_path.with_name(f".{manifest_path.name}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(manifest_path)
    barrier()

    starts = range(0, n, shard_windows)
    mine = [i for i in range(len(starts)) if i % world_size() == rank()]
    todo = [i for i in mine if not shard_path(cache_dir, i).exists()]
    log.info(f"teacher_cache: {n} windows in {len(starts)} shards of up to {shard_windows} (top-{k}); "
             f"{len(mine) - len(todo)} present, computing {len(todo)}")
    for i in progress(todo, desc="teacher top-k"):
        chunk = windows[starts[i]: starts[i] + shard_windows]
        parts = [teacher_topk(teacher, chunk[j: j + distill.micro_batch_size].to(device), k, dtype)
                 for j in range(0, len(chunk), distill.micro_batch_size)]
        _write_shard(shard_path(cache_dir, i), torch.cat([v for v, _ in parts]).cpu(),
                     torch.cat([t for _, t in parts]).cpu())
    barrier()
    return load_teacher_cache(cache_dir, windows, len(starts), computed=len(todo))


def load_teacher_cache(cache_dir: Path, windows: torch.Tensor, shards: int, computed: int = 0) -> TeacherCache:
    """The cache's shards, concatenated, with the lookup from window tokens to rows."""
    loaded = [load_file(str(shard_path(cache_dir, i))) for i in range(shards)]
    values = torch.cat([s["values"] for s in loaded])  # (N, S-1, k)
    indices = torch.cat([s["indices"] for s in loaded])
    assert values.shape[:2] == (len(windows), windows.shape[1] - 1), (values.shape, windows.shape)
    nbytes = sum(shard_path(cache_dir, i).stat().st_size for i in range(shards))
    summary = {"dir": cache_dir.name, "windows": len(values), "bytes": nbytes, "shards": shards, "computed": computed,
               "reused": shards - computed, "topk": values.shape[-1], "dtype": str(values.dtype).removeprefix("torch.")}
    log.info(f"teacher_cache: {nbytes / 2**20:.1f} MiB in {shards} shards ({computed} computed now)")
    return TeacherCache(values, indices, {window_key(w): r for r, w in enumerate(windows)}, summary)


def cached_topk_kl(student: torch.Tensor, t_values: torch.Tensor, t_indices: torch.Tensor, valid: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """`losses.topk_kl` from the teacher's cached top-k: the same operations on the same numbers, so the same value
    and gradient bit for bit. Both distributions are renormalized over the k tokens, so the student's logits at the
    k indices are all of it that enters (its log-sum-exp over the whole vocabulary cancels).

    Args:
        student: (..., V) student logits; t_values / t_indices: (..., k) cached teacher logits and int64 ids;
        valid: (...) 0/1.
    """
    t = F.log_softmax(t_values.float() / temperature, dim=-1)  # (..., k)
    s = F.log_softmax(student.float().gather(-1, t_indices) / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return (per_token * valid).sum() / valid.sum().clamp_min(1.0) * temperature**2


def cached_distill_loss(cache: TeacherCache, cfg, chunked: bool = True,
                        budgets: tuple[int, int] = (losses.HEAD_CHUNK_BYTES, losses.LOSS_CHUNK_BYTES)):
    """`distill.distill_loss` with the teacher's top-k from `cache`: (module, input_ids) -> (loss, {part: value}).

    The parts are top-k KL and, when weighted, the LM loss (validate.py rules out the losses that need the whole
    teacher). `chunked` runs them through `losses.chunked_head_loss`, as distill_loss does, so the student's full
    logits never exist at once.
    """
    weights = logit_loss_parts(cfg)
    assert set(weights) <= {"topk_kl", "lm"}, f"teacher_cache with losses {sorted(weights)}"

    def logit_parts(s, values, indices, labels, valid) -> dict:
        parts = {"topk_kl": (weights["topk_kl"], cached_topk_kl(s, values, indices, valid, cfg.temperature))}
        if "lm" in weights:
            parts["lm"] = (weights["lm"], losses.lm_loss(s, labels, valid))
        return parts

    def compute(module: nn.Module, ids: torch.Tensor):
        keep = predicting_positions(ids)
        labels = ids[:, 1:]  # (B, S-1)
        valid = torch.ones(labels.shape, device=ids.device)
        values, indices = cache.lookup(ids)  # (B, S-1, k) each
        student_model = getattr(module, "module", module).model  # DDP keeps the Student in .module
        if not (chunked and output_head(student_model) is not None):
            out = module(ids, logits_to_keep=keep)
            parts = logit_parts(out.logits, values, indices, labels, valid)  # (B, S-1, V) logits
            return sum(w * v for w, v in parts.values()), {k: v.detach() for k, (_, v) in parts.items()}
        flat = (values.flatten(0, 1), indices.flatten(0, 1), labels.reshape(-1), valid.reshape(-1))  # N = B * (S-1)
        tokens = flat[3].sum().clamp_min(1.0)

        def chunk_loss(s: torch.Tensor, _: None, rows: slice):  # (m, V) student logits
            share = flat[3][rows].sum() / tokens  # a token mean over the rows -> their part of the mean
            chunk = {k: (w, v * share) for k, (w, v) in logit_parts(s, *(x[rows] for x in flat)).items()}
            return sum(w * v for w, v in chunk.values()), {k: v for k, (_, v) in chunk.items()}

        def head_loss(hidden: torch.Tensor, head: nn.Linear):
            return losses.chunked_head_loss(hidden.flatten(0, 1).to(head.weight.dtype), head, chunk_loss, None,
                                            budgets)

        out = module(ids, logits_to_keep=keep, head_loss=head_loss)
        return out.loss, {k: v.detach() for k, v in out.parts.items()}

    return compute
