"""The cost model: parameters, forward FLOPs and memory of a model at any target, from the family's pruning map and
the original parameter shapes, without building the pruned model.

A search enumerates thousands of candidate targets; each costs one pass over the parameter inventory.

FLOPs count what a forward pass over one sequence of S tokens computes, as torch's FlopCounterMode counts it
(tests/test_cost.py checks integer equality on every family):
- every linear layer (LM head included): 2 FLOPs per weight per token (a bias add counts nothing);
- attention scores and values: 4 * S^2 * heads * head_dim per attention layer (the full S x S product that the
  math kernels compute; FlopCounterMode sees it with attn_implementation="eager");
- Mamba-2 (transformers' chunked scan): the depthwise conv over S + K - 1 positions (it pads K - 1 and slices) and
  the five einsums of the SSD scan on the sequence padded to whole chunks of Q = chunk_size (c = ceil(S / Q)):
  2cQ^2 H (N + P) + 4cQ H P N + 2(c + 1)^2 H P N for H heads of head dim P and state size N;
- embeddings, norms, activations, rotary and residual adds: 0.
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
        extra: family constants the FLOPs and cache formulas need: ssm_state_size, conv_kernel, chunk_size.
        aliases: further parameter names that share another parameter's tensor (BERT's MLM decoder bias), counted
            once.

    Every method takes `per_layer`: sizes of single layers that differ from `target` (original layer index ->
    {"num_attention_heads": 7, "ffn_hidden_size": 900}), as GradNAS keeps its own heads and width per layer.
    """

    pmap: object
    shapes: dict[str, tuple[int, ...]]
    dims: dict[str, int]
    tied: bool = False
    layer_types: list[str] | None = None
    extra: dict | None = None
    aliases: tuple[str, ...] = ()

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

    def pruned_shapes(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None,
                      per_layer: dict | None = None) -> dict:
        """Parameter shapes at `target` (missing keys keep the original sizes), tied aliases left out."""
        target = {**self.dims, **(target or {})}
        shapes = self.pmap.shapes_at(self.shapes, self.dims, target, self._kept(target, kept_layers), per_layer)
        if self.tied and self.pmap.tied:
            shapes.pop(self.pmap.tied[0], None)
        for name in self.aliases:
            shapes.pop(name, None)
        return shapes

    def params(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None,
               per_layer: dict | None = None) -> int:
        """Exact parameter count at `target`."""
        return sum(math.prod(s) for s in self.pruned_shapes(target, kept_layers, per_layer).values())

    def _layers_with(self, kind: str, kept: list[int]) -> list[int | None]:
        """The kept layers that hold a mixer of `kind` ("attention" or "ssm")."""
        out = []
        for name in self.shapes:
            rule, layer = self.pmap.rule_for(name)
            if rule.kind == kind and (layer is None or layer in kept):
                out.append(layer)
        return out

    def _mixers(self, target: dict[str, int], kept: list[int]) -> dict[str, int]:
        """How many kept layers hold an attention / an SSM mixer."""
        return {kind: len(self._layers_with(kind, kept)) for kind in ("attention", "ssm")}

    def flops(self, seq_len: int, target: dict[str, int] | None = None, kept_layers: list[int] | None = None,
              per_layer: dict | None = None) -> int:
        """Forward FLOPs of one sequence of `seq_len` tokens (logits at every position) at `target`."""
        t = {**self.dims, **(target or {})}
        kept = self._kept(t, kept_layers)
        shapes = self.pmap.shapes_at(self.shapes, self.dims, t, kept, per_layer)  # tied head included: a matmul
        total = 0
        for name, shape in shapes.items():
            matmul = self.pmap.rule_for(name)[0].matmul
            if matmul:  # "first": a pooler, on the first token only
                total += 2 * (1 if matmul == "first" else seq_len) * math.prod(shape)
        per_layer = per_layer or {}
        for layer in self._layers_with("attention", kept):
            heads = per_layer.get(layer, {}).get("num_attention_heads", t["num_attention_heads"])
            total += 4 * seq_len**2 * heads * t["head_dim"]
        mixers = self._mixers(t, kept)
        if mixers["ssm"]:
            total += mixers["ssm"] * (self._conv_flops(t, seq_len) + self._scan_flops(t, seq_len))
        return total

    def _conv_dim(self, t: dict[str, int]) -> int:
        return t["mamba_num_heads"] * t["mamba_head_dim"] + 2 * t["mamba_num_groups"] * self.extra["ssm_state_size"]

    def _conv_flops(self, t: dict[str, int], seq_len: int) -> int:
        kernel = self.extra["conv_kernel"]
        return 2 * self._conv_dim(t) * kernel * (seq_len + kernel - 1)

    def _scan_flops(self, t: dict[str, int], seq_len: int) -> int:
        q = self.extra["chunk_size"]
        c = -(-seq_len // q)
        h, p, n = t["mamba_num_heads"], t["mamba_head_dim"], self.extra["ssm_state_size"]
        return 2 * c * q * q * h * (n + p) + 4 * c * q * h * p * n + 2 * (c + 1) ** 2 * h * p * n

    def memory(self, target: dict[str, int] | None = None, kept_layers: list[int] | None = None,
               dtype: str = "bfloat16", batch_size: int = 1, seq_len: int = 4096,
               per_layer: dict | None = None) -> dict[str, int]:
        """Bytes for inference at `target`: weights, KV cache (K and V per attention layer for every token) and SSM
        state (conv window and scan state per Mamba layer, as transformers' cache holds them)."""
        t = {**self.dims, **(target or {})}
        kept = self._kept(t, kept_layers)
        width = DTYPE_BYTES[dtype]
        mixers = self._mixers(t, kept)
        ssm = 0
        kv_heads = sum((per_layer or {}).get(layer, {}).get("num_query_groups", t.get("num_query_groups", 0))
                       for layer in self._layers_with("attention", kept))
        kv = 2 * kv_heads * t.get("head_dim", 0) * seq_len * batch_size * width
        if mixers["ssm"]:
            state = (self._conv_dim(t) * self.extra["conv_kernel"]
                     + t["mamba_num_heads"] * t["mamba_head_dim"] * self.extra["ssm_state_size"])
            ssm = mixers["ssm"] * state * batch_size * width
        weights = self.params(t, kept, per_layer) * width
        return {"weights": weights, "kv_cache": kv, "ssm_state": ssm, "total": weights + kv + ssm}
