"""The cost model: parameters, forward FLOPs per token and memory of a model at any target, from the family's
pruning map and the original parameter shapes, without building the pruned model.

A search enumerates thousands of candidate targets; each costs one pass over the parameter inventory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (tied aliases included, as in the state dict), without copying data."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


@dataclass
class CostModel:
    """Costs of one model family instance at any target.

    Attributes:
        pmap: the family's PruningMap.
        shapes: original parameter shapes by name (`parameter_shapes`, or read from a checkpoint's header).
        dims: the original sizes (`adapter.dims()`).
        tied: the LM head shares the input embedding (count it once).
        layer_types: per layer, its type (hybrids); layers of other types hold other parameters.
        extra: family constants the FLOPs and cache formulas need (ssm state size, conv kernel, chunk size).
    """

    pmap: object
    shapes: dict[str, tuple[int, ...]]
    dims: dict[str, int]
    tied: bool = False
    layer_types: list[str] | None = None
    extra: dict | None = None

    def _kept(self, target: dict[str, int], kept_layers: list[int] | None) -> list[int]:
        n, keep = self.dims["num_layers"], target.get("num_layers", self.dims["num_layers"])
        if kept_layers is not None:
            if len(kept_layers) != keep:
                raise ValueError(f"kept_layers has {len(kept_layers)} layers but num_layers={keep}")
            return list(kept_layers)
        if keep < n and len({self._layer_signature(i) for i in range(n)}) > 1:
            raise ValueError(f"num_layers={keep} of a {n}-layer model whose layers differ depends on which layers "
                             "stay; pass kept_layers (e.g. plan.kept_layers).")
        return list(range(keep))

    def _layer_signature(self, layer: int) -> tuple:
        prefix = self.pmap.layers.format(i=layer)
        return tuple(sorted((name[len(prefix):], shape) for name, shape in self.shapes.items()
                            if name.startswith(prefix)))

    def pruned_shapes(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> dict:
        """Parameter shapes at `target` (missing keys keep the original sizes), tied aliases left out."""
        target = {**self.dims, **(target or {})}
        shapes = self.pmap.shapes_at(self.shapes, self.dims, target, self._kept(target, kept_layers))
        if self.tied and self.pmap.tied:
            shapes.pop(self.pmap.tied[0], None)
        return shapes

    def params(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None) -> int:
        """Exact parameter count at `target`."""
        return sum(math.prod(s) for s in self.pruned_shapes(target, kept_layers).values())

    def weight_bytes(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None,
                     dtype: str = "bfloat16") -> int:
        return self.params(target, kept_layers) * DTYPE_BYTES[dtype]
