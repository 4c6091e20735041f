"""Pruning a safetensors checkpoint one tensor at a time: read a tensor from the source shards, slice it by the
family's pruning map and append it to the output shard, whose header was written beforehand from the pruned shapes.

Peak memory is one source tensor and its slice, whatever the checkpoint's size. The result is the same
bits as pruning the loaded model (`apply.apply_plan`) and saving it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from llmprune.errors import ConfigError


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
        self.stored = {_rename(name, self.renames): name for name in self.files}  # module name -> stored name

    def names(self) -> list[str]:
        return list(self.stored)

    def stored_name(self, name: str) -> str:
        return _rename(name, [(dst, src) for src, dst in self.renames])

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its shard. The shard is opened for this call only: a mapping kept open would
        keep every page read so far resident."""
        stored = self.stored[name]
        with safe_open(str(self.folder / self.files[stored]), "pt") as f:
            return f.get_tensor(stored)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor (e.g. a slice of the LM head's vocabulary), copied out of its shard."""
        stored = self.stored[name]
        with safe_open(str(self.folder / self.files[stored]), "pt") as f:
            return f.get_slice(stored)[start:stop].clone()

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.stored[name]
        with safe_open(str(self.folder / self.files[stored]), "pt") as f:
            return tuple(f.get_slice(stored).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.stored}

    def layer_tensors(self, pmap, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors by their name inside the layer (the prefix stripped)."""
        prefix = pmap.layers.format(i=layer)
        return {name[len(prefix):]: self.get(name) for name in self.stored if name.startswith(prefix)}


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


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _stored_dtype(source: Checkpoint, name: str) -> torch.dtype:
    stored = source.stored[name]
    with safe_open(str(source.folder / source.files[stored]), "pt") as f:
        code = f.get_slice(stored).get_dtype()
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}[code]


def _write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> None:
    """A safetensors file whose header is written first from `specs` (name, dtype, shape) and whose tensors then
    come one at a time from the iterator `tensors` (same order), so one tensor is in memory at a time. Source
    tensors are mappings of their shard: the pages a slice reads count as resident until it is dropped."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            tensor = next(tensors)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), (name, tensor.dtype, tensor.shape)
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is read: never two at once


@torch.no_grad()
def write_pruned_shards(source: Checkpoint, pmap, plan, out_dir: Path, max_shard_size: str | int = "2GB",
                        dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> dict:
    """Prune every tensor of `source` into safetensors shards in `out_dir` (HF names and index file).

    The pruned shapes are known beforehand (pmap.shapes_at), so each shard's header is written first and its
    tensors are read, sliced and written one at a time: peak memory is one source tensor and its slice.

    Args:
        dtype: cast floating tensors to this dtype after slicing (None keeps the stored dtype).
        skip: names not to write (a tied LM head that the embedding already holds).

    Returns:
        {"tensors": count, "bytes": total bytes written, "shards": count}.
    """
    names = [n for n in source.names() if n not in skip]
    shapes = pmap.shapes_at({n: source.shape(n) for n in names}, plan.original, plan.target, plan.kept_layers)
    specs, limit = [], parse_size(max_shard_size)
    for name in names:
        if name not in shapes:  # a removed layer
            continue
        stored = _stored_dtype(source, name)
        out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        new_name = pmap.renamed(name, pmap.rule_for(name)[1], plan.kept_layers)
        specs.append((name, source.stored_name(new_name), out_dtype, shapes[name]))
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[3]) * torch.tensor([], dtype=spec[2]).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    def pruned(shard):
        for name, _, out_dtype, _ in shard:
            tensor = pmap.prune_tensor(name, source.get(name), plan)[1].to(out_dtype)
            yield tensor
            del tensor  # the writer is done with it

    count = len(shards)
    files = ["model.safetensors"] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors"
                                                      for k in range(count)]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        _write_safetensors(out_dir / file, [(new, dt, shape) for _, new, dt, shape in shard], pruned(shard))
        for _, new, dt, shape in shard:
            weight_map[new] = file
            total += math.prod(shape) * torch.tensor([], dtype=dt).element_size()
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(weight_map), "bytes": total, "shards": count}
