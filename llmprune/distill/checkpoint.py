"""Training checkpoints: written atomically, loaded without unpickling untrusted code, resumed exactly.

Layout: <dir>/step_000050/{model.safetensors, optimizer.pt, scheduler.pt, state.json, rng_rank0.pt, ...} and
<dir>/latest naming the newest complete step. A step directory is assembled under a temporary name and renamed
only when every rank's part is in it, then `latest` is replaced in one rename: a kill at any instant leaves the
previous checkpoint intact (tests/test_kill_resume.py kills a run inside the write). Reading a damaged checkpoint
fails with the file's name and what to do.

Model and optimizer state are whole tensors keyed by parameter name (torch.distributed.checkpoint's full state
dicts), gathered to rank 0 from a plain, DDP or FSDP2-sharded module alike, so a checkpoint does not depend on how
many processes wrote it or how they sharded the model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmprune.distributed import barrier, is_rank_zero, rank
from llmprune.files import load_safetensors, load_torch, read_json

log = logging.getLogger("llmprune")

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


def _complete_steps(directory: Path) -> list[Path]:
    """Step directories that were renamed into place (a temporary one starts with a dot), oldest first."""
    return sorted(p for p in Path(directory).glob("step_*") if (p / "state.json").is_file())


def _fix(path: Path) -> str:
    """What to do about a damaged checkpoint: fall back to the one before it, or start over."""
    older = [p for p in _complete_steps(path.parent) if p.name < path.name]
    if older:
        return f"delete {path} to resume from {older[-1].name}, or delete {path.parent} to start this stage over"
    return f"delete {path.parent} to start this stage over"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else (no pointer, or it names a step that is gone)
    the newest step directory. Its state.json must parse: a damaged one is an InputFileError."""
    directory = Path(directory)
    pointer = directory / "latest"
    named = directory / pointer.read_text().strip() if pointer.is_file() else None
    path = named if named is not None and (named / "state.json").is_file() else None
    if path is None:
        steps = _complete_steps(directory)
        if not steps:
            return None
        path = steps[-1]
        if named is not None:
            log.warning(f"{pointer} names {named.name}, which is gone; resuming from {path.name}")
    read_json(path / "state.json", _fix(path))
    return path


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore module, optimizer, scheduler and this rank's RNG; returns state.json (every rank calls it).

    Every file is read before anything is restored, so a damaged one (an InputFileError naming it and the fix)
    leaves the module, optimizer and scheduler as they were.
    """
    path = Path(path)
    fix = _fix(path)
    state = read_json(path / "state.json", fix)
    model_state = load_safetensors(path / "model.safetensors", fix)
    optimizer_state = load_torch(path / "optimizer.pt", fix)
    scheduler_state = load_torch(path / "scheduler.pt", fix)
    rng_file = path / f"rng_rank{rank()}.pt"
    rng_state = load_torch(rng_file, fix) if rng_file.exists() else None
    set_model_state_dict(module, model_state, options=WHOLE)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=WHOLE)
    scheduler.load_state_dict(scheduler_state)
    if rng_state is not None:
        _set_rng_state(rng_state)
    return state
