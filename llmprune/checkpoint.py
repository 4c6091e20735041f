"""Training checkpoints: written atomically, loaded without unpickling untrusted code, resumed exactly.

Layout: <dir>/step_000050/{model.safetensors, optimizer.pt, scheduler.pt, state.json, rng_rank0.pt, ...} and
<dir>/latest naming the newest complete step. A step directory is assembled under a temporary name and renamed
only when every rank's part is in it, then `latest` is replaced in one rename: a kill at any instant leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from llmprune.distributed import barrier, is_rank_zero, rank


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


def save_checkpoint(directory: Path, step: int, module: torch.nn.Module, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    """Save training state at `step` (collective under torchrun: every rank calls it)."""
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    tmp = directory / f".step_{step:06d}.tmp"
    if is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
    if is_rank_zero():
        save_model(module, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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
    """Restore module, optimizer, scheduler and this rank's RNG; returns state.json."""
    path = Path(path)
    load_model(module, str(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_rank{rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "state.json").read_text())
