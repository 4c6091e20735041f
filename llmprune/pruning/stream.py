"""Pruning a safetensors checkpoint one tensor at a time: read a tensor from the source shards, slice it by the
family's pruning map, add it to the output shard being filled, write that shard when it reaches the shard size.

Peak memory is one source tensor plus one output shard, whatever the checkpoint's size. The result is the same
bits as pruning the loaded model (`apply.apply_plan`) and saving it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune.config import ConfigError


def key_renames(model) -> list[tuple[str, str]]:
    """(checkpoint name prefix, module name prefix) pairs that transformers applies when it loads this model, e.g.
    NemotronH checkpoints store 'backbone.*' for the module's 'model.*'. Only plain prefix renamings exist for the
    supported families; anything else is refused rather than guessed."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renames = []
    for t in get_model_conversion_mapping(model, add_legacy=False):
        if type(t) is WeightRenaming:
            (src,), (dst,) = t.source_patterns, t.target_patterns
            if any(ch in src + dst for ch in "()[]\\*+?^$|"):
                raise ConfigError(f"streaming: {type(model).__name__} renames checkpoint keys with a pattern "
                                  f"({src!r} -> {dst!r}); set model.streaming=false.")
            renames.append((src, dst))
    return renames


def _rename(name: str, renames: list[tuple[str, str]]) -> str:
    for src, dst in renames:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


class Checkpoint:
    """The safetensors shards of a Hugging Face model directory, read lazily by tensor name.

    Names are the model's module names (`renames` from `key_renames` map the stored names to them); `stored_name`
    gives a module name back as the checkpoint stores it (what save_pretrained writes).
    """

    def __init__(self, folder: str | Path, renames: list[tuple[str, str]] = ()):
        self.folder = Path(folder)
        self.renames = list(renames)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])  # name -> file
        elif (self.folder / "model.safetensors").exists():
            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConfigError(f"{self.folder} holds no model.safetensors or model.safetensors.index.json; streaming "
                              "needs a safetensors checkpoint (set model.streaming=false for other formats).")
        self._open: dict[str, object] = {}
        self.stored = {_rename(name, self.renames): name for name in self.files}  # module name -> stored name

    def names(self) -> list[str]:
        return list(self.stored)

    def stored_name(self, name: str) -> str:
        return _rename(name, [(dst, src) for src, dst in self.renames])

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def _handle(self, file: str):
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), "pt")
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        stored = self.stored[name]
        return self._handle(self.files[stored]).get_tensor(stored)

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.stored[name]
        return tuple(self._handle(self.files[stored]).get_slice(stored).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.stored}

    def layer_tensors(self, pmap, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors by their name inside the layer (the prefix stripped)."""
        prefix = pmap.layers.format(i=layer)
        return {name[len(prefix):]: self.get(name) for name in self.stored if name.startswith(prefix)}

    def close(self) -> None:
        self._open.clear()


def _shards(tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
    if shard:
        yield shard


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / bytes -> bytes (transformers' max_shard_size spelling)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


@torch.no_grad()
def write_pruned_shards(source: Checkpoint, pmap, plan, out_dir: Path, max_shard_size: str | int = "2GB",
                        dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> dict:
    """Prune every tensor of `source` into safetensors shards in `out_dir` (HF names and index file).

    Args:
        dtype: cast floating tensors to this dtype after slicing (None keeps the stored dtype).
        skip: names not to write (a tied LM head that the embedding already holds).

    Returns:
        {"tensors": count, "bytes": total bytes written, "shards": count}.
    """
    def pruned() -> Iterator[tuple[str, torch.Tensor]]:
        for name in source.names():
            if name in skip:
                continue
            out = pmap.prune_tensor(name, source.get(name), plan)
            if out is not None:
                new_name, tensor = out
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield source.stored_name(new_name), tensor

    weight_map, total, files = {}, 0, []
    for k, shard in enumerate(_shards(pruned(), parse_size(max_shard_size))):
        file = f"model-{k + 1:05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        files.append(file)
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        del shard
    if len(files) == 1:
        (out_dir / files[0]).rename(out_dir / "model.safetensors")
        weight_map = dict.fromkeys(weight_map, "model.safetensors")
    else:
        names = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
        for old, new in names.items():
            (out_dir / old).rename(out_dir / new)
        weight_map = {n: names[f] for n, f in weight_map.items()}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(weight_map), "bytes": total, "shards": len(files)}
