"""Training checkpoints: written atomically, loaded without unpickling untrusted code, resumed exactly.

Layout: <dir>/step_000050/{model.safetensors, optimizer.pt, scheduler.pt, state.json, rng_rank0.pt, ...} and
<dir>/latest naming the newest complete step. A step directory is assembled under a temporary name and renamed
only when every rank's part is in it, then `latest` is replaced in one rename: a kill at any instant leaves the
previous checkpoint intact.

Model and optimizer state are whole tensors keyed by parameter name (torch.distributed.checkpoint's full state
dicts), gathered to rank 0 from a plain, DDP or FSDP2-sharded module alike, so a checkpoint does not depend on how
many processes wrote it or how they sharded the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmprune.distributed import barrier, is_rank_zero, rank

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on rank 0's CPU, {} elsewhere
WHOLE = StateDictOptions(full_state_dict=True)  # loading: every rank passes whole tensors; FSDP keeps its shard


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias an earlier tensor (tied embeddings); safetensors refuses shared storage and loading
    restores the tie from the module itself."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.contiguous()
    return kept


def save_checkpoint(directory: Path, step: int, module: torch.nn.Module, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    """Save training state at `step` (collective under torchrun: every rank calls it)."""
    directory = Path(directory)
    model_state = get_model_state_dict(module, options=GATHER)  # collective for a sharded module
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=GATHER)
    final = directory / f"step_{step:06d}"
    tmp = directory / f".step_{step:06d}.tmp"
    if is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
    if is_rank_zero():
        save_file(_without_aliases(model_state), str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    barrier()
    if is_rank_zero():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = directory / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
        steps = sorted(p for p in directory.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore module, optimizer, scheduler and this rank's RNG; returns state.json (every rank calls it)."""
    path = Path(path)
    set_model_state_dict(module, load_file(str(path / "model.safetensors")), options=WHOLE)
    set_optimizer_state_dict(module, optimizer, torch.load(path / "optimizer.pt", weights_only=True), options=WHOLE)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_rank{rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "state.json").read_text())
