"""Calibration of checkpoints larger than memory, one layer at a time (model.streaming).

The model is built with its parameters on the meta device; every tensor stays in the safetensors shards until it is
needed (embeddings to start the batches, a layer to run them, final norm and LM head to end them). One pass with
every layer replaced by a recorder embeds every batch and records the keyword arguments the backbone hands each
layer (masks, rotary embeddings). Then, for each layer in turn: load its tensors,
run every batch through it (the importance hooks fire as in a whole-model pass), keep its outputs as the next layer's
inputs, free it. Every Minitron signal is layer-local, so the scores are those of the in-memory pass, bit for bit:
each site sees the same inputs and sums its batches in the same order.

Depth by removal rides along: a candidate that removes layers [s, s + k) is a stream of hidden states that forks from
the main one at layer s's input and skips those layers; at the end every stream goes through the final norm and LM
head. Held-out evaluation is one more stream. Peak memory: one layer, the head, and the cached hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.adapters.heads import CausalLMHead
from llmprune.allocator import release_freed_memory
from llmprune.data import Batch
from llmprune.importance.activation import ActivationScores, _hook_block_importance, _hook_sites
from llmprune.importance.depth import named_removal_scores
from llmprune.progress import progress
from llmprune.pruning.stream import Checkpoint, key_renames


def _free(module: nn.Module, name: str) -> None:
    p = module._parameters.get(name)
    if p is not None:
        module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


class LayerStream:
    """A model whose layers live in a safetensors checkpoint until they are needed.

    Attributes:
        model: the Hugging Face model, its parameters on meta except while `resident` / `load_layer` hold them.
        adapter: its family adapter (hook sites, pruning map, head).
        checkpoint: the source shards.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from llmprune.adapters import get_adapter

        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)
        self.model.eval()
        self.checkpoint = Checkpoint(folder, key_renames(self.model))
        self.adapter = get_adapter(self.model)
        self.pmap = self.adapter.pruning_map()
        self.dtype = dtype
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        outside = [n for n in self.checkpoint.names() if self.pmap.layer_of(n) is None]
        unknown = set(outside) - set(self.model.state_dict())
        assert not unknown, f"checkpoint tensors the model does not have: {sorted(unknown)}"

        def owned_by(module: nn.Module) -> list[str]:
            prefix = next(n for n, m in self.model.named_modules() if m is module) + "."
            return [n for n in outside if n.startswith(prefix)]

        self.embedding_names = owned_by(self.model.get_input_embeddings())
        self.head_names = self.embedding_names if self.tied else owned_by(self.model.get_output_embeddings())
        small = [n for n in outside if n not in self.embedding_names + self.head_names]  # the final norm
        self.model.load_state_dict(_cast({n: self.checkpoint.get(n) for n in small}, dtype), assign=True, strict=False)

    @contextmanager
    def resident(self, names: list[str]):
        """Load the tensors `names` (outside the layers) for the duration of the block, then free them again: the
        embeddings are needed to start the batches, the head only to end them."""
        self.model.load_state_dict(_cast({n: self.checkpoint.get(n) for n in names}, self.dtype), assign=True,
                                   strict=False)
        if self.tied:
            self.model.tie_weights()
        try:
            yield
        finally:
            owners = dict(self.model.named_modules())
            for name in names:
                owner, _, attr = name.rpartition(".")
                _free(owners[owner], attr)
            if self.tied:
                self.model.tie_weights()

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers)

    def load_layer(self, i: int) -> nn.Module:
        layer = self.adapter.layers[i]
        layer.load_state_dict(_cast(self.checkpoint.layer_tensors(self.pmap, i), self.dtype), assign=True,
                              strict=True)
        return layer

    def free_layer(self, i: int) -> None:
        """Drop layer i's tensors and give the freed heap pages back to the OS: a layer's activations leave the
        heap fragmented, and without a trim the resident size grew by ~55 MB per layer of a 4096-wide model
        (bench/streaming_memory.py, anonymous memory after calibration: 0.87 GB at 11 layers, 1.47 GB at 22)."""
        for module in self.adapter.layers[i].modules():
            for name in list(module._parameters):
                _free(module, name)
        release_freed_memory()

    @torch.no_grad()
    def layer_inputs(self, batches: Sequence[Batch]) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """(layer 0's input per batch, per batch and layer the keyword arguments the backbone passes)."""
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict]] = []
        layers = self.adapter.layers

        def recorder(i):
            def forward(hidden_states, *args, **kw):
                assert not args, "layers are called with hidden states and keyword arguments"
                if i == 0:
                    hidden.append(hidden_states)
                kwargs[-1].append(kw)
                return hidden_states
            return forward

        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        try:
            with self.resident(self.embedding_names):
                for batch in batches:
                    kwargs.append([])
                    self.adapter.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          use_cache=False)
        finally:
            for layer in layers:
                del layer.forward
        return hidden, kwargs


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def streaming_scores(stream: LayerStream, batches: Sequence[Batch], depth_batches: Sequence[Batch] = (),
                     metric: str = "lm_loss", drop_one: bool = False,
                     block_sizes: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Activation scores, Block Importance and (for `depth_batches`) the removal scores, streaming the layers.

    Returns the names and values `activation.activation_scores` and `depth.removal_scores` return.
    """
    adapter, n = stream.adapter, stream.num_layers
    stats = ActivationScores()
    bi_totals = torch.zeros(n, dtype=torch.float32)
    tokens = torch.zeros((), dtype=torch.float32)
    hidden, kwargs = stream.layer_inputs(batches)
    masks = [None if b.attention_mask is None or bool(b.attention_mask.all()) else b.attention_mask for b in batches]
    for b, batch in enumerate(batches):
        tokens += batch.input_ids.numel() if masks[b] is None else masks[b].sum()
    candidates = [(i, 1) for i in range(n)] if drop_one else []
    candidates += [(s, k) for k in block_sizes for s in range(n - k + 1)]
    depth_hidden, depth_kwargs = stream.layer_inputs(depth_batches) if candidates else ([], [])
    forks: dict[int, list[torch.Tensor]] = {}  # candidate -> hidden states per depth batch

    handles = _hook_sites(adapter.importance_sites(), stats)
    handles += _hook_block_importance(adapter.layers, range(n), bi_totals, stats)
    try:
        for i in progress(range(n), desc="calibrate (streaming layers)"):
            layer = stream.load_layer(i)
            for b in range(len(batches)):
                stats.mask = masks[b]
                hidden[b] = _run(layer, hidden[b], kwargs[b][i])
            stats.paused = True  # depth streams are not calibration samples
            for c, (start, size) in enumerate(candidates):
                if start == i:
                    forks[c] = list(depth_hidden)  # layer i's input: layers start .. start + size - 1 go
                if c in forks and not start <= i < start + size:
                    forks[c] = [_run(layer, h, depth_kwargs[b][i]) for b, h in enumerate(forks[c])]
            depth_hidden = [_run(layer, h, depth_kwargs[b][i]) for b, h in enumerate(depth_hidden)]
            stats.paused = False
            stream.free_layer(i)
    finally:
        for handle in handles:
            handle.remove()
    scores = adapter.derive_scores(stats.finalize())
    scores["block_importance"] = bi_totals / tokens
    if candidates:
        with stream.resident(stream.head_names):
            scores.update(_removal_scores(adapter, depth_batches, depth_hidden, forks, candidates, n, metric, drop_one,
                                          block_sizes))
    return scores


def _removal_scores(adapter, batches, base, forks, candidates, n, metric, drop_one, block_sizes) -> dict:
    """depth.removal_scores' arithmetic on the streamed final hidden states (same order of sums)."""
    sums = torch.zeros(len(candidates), dtype=torch.float32)
    base_sum = torch.zeros((), dtype=torch.float32)
    tokens = torch.zeros((), dtype=torch.float32)
    for b, batch in enumerate(batches):
        ids, mask = batch.input_ids, batch.attention_mask
        base_logits = adapter.logits(base[b][:, :-1])
        teacher = None
        if metric == "kl":
            logprobs = F.log_softmax(base_logits.float(), dim=-1)
            teacher = (logprobs, logprobs.exp())
        base_sum += CausalLMHead.token_losses(base_logits, ids, mask, metric, teacher)
        tokens += ids[:, 1:].numel() if mask is None else mask[:, 1:].sum()
        for c in range(len(candidates)):
            sums[c] += CausalLMHead.token_losses(adapter.logits(forks[c][b][:, :-1]), ids, mask, metric, teacher)
    return named_removal_scores((sums - base_sum) / tokens, n, metric, drop_one, block_sizes)


@torch.no_grad()
def streaming_hidden(stream: LayerStream, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The last layer's output (B, S, H) per batch, streaming the layers (held-out evaluation)."""
    hidden, kwargs = stream.layer_inputs(batches)
    for i in progress(range(stream.num_layers), desc="evaluate (streaming layers)"):
        layer = stream.load_layer(i)
        hidden = [_run(layer, h, kwargs[b][i]) for b, h in enumerate(hidden)]
        stream.free_layer(i)
    return hidden


HEAD_CHUNK_BYTES = 64 * 2**20  # LM head rows read at a time by streaming_evaluate


def _head_weight(stream: LayerStream) -> str:
    """The name of the LM head's weight (the embedding when tied); the supported families' heads have no bias."""
    (name,) = [n for n in stream.head_names if n.endswith("weight")]
    return name


def _vocab_chunks(stream: LayerStream) -> list[tuple[int, int]]:
    vocab, width = stream.checkpoint.shape(_head_weight(stream))
    rows = max(1, HEAD_CHUNK_BYTES // (4 * width))
    return [(v, min(v + rows, vocab)) for v in range(0, vocab, rows)]


def _chunk_logits(stream: LayerStream, normed: list[torch.Tensor], rows: tuple[int, int]) -> list[torch.Tensor]:
    """Float32 logits of vocabulary rows [start, stop) for every batch's normed states (B, S-1, H)."""
    weight = stream.checkpoint.rows(_head_weight(stream), *rows)
    if stream.dtype is not None:
        weight = weight.to(stream.dtype)
    return [F.linear(h.to(weight.dtype), weight).float() for h in normed]


@torch.no_grad()
def streaming_evaluate(model: LayerStream, batches: Sequence[Batch], hidden: list[torch.Tensor],
                       teacher: tuple[LayerStream, list[torch.Tensor]] | None = None) -> dict:
    """evaluate()'s numbers (loss, perplexity, KL to the teacher) from streamed last-layer outputs `hidden`
    (`streaming_hidden`); `teacher` = (its stream, its outputs).

    Neither LM head is ever whole in memory: both are read in slices of the vocabulary (HEAD_CHUNK_BYTES). A first
    pass accumulates each model's log-sum-exp and the labels' logits; with a teacher a second pass sums
    KL = sum_v p_t(v) (t_v - s_v) + lse_s - lse_t. (Both heads at once were the largest part of the streaming peak.)
    """
    streams = [(model, hidden)] + ([teacher] if teacher else [])
    normed = [[stream.adapter.head.norm(h[:, :-1]) for h in states] for stream, states in streams]  # (B, S-1, H)
    labels = [batch.input_ids[:, 1:] for batch in batches]
    lse = [[torch.full(lab.shape, -math.inf) for lab in labels] for _ in streams]
    label_logit = [torch.zeros(lab.shape) for lab in labels]
    chunks = _vocab_chunks(model)
    for start, stop in chunks:
        for k, (stream, _) in enumerate(streams):
            for b, logits in enumerate(_chunk_logits(stream, normed[k], (start, stop))):
                lse[k][b] = torch.logaddexp(lse[k][b], torch.logsumexp(logits, dim=-1))
                if k == 0:
                    inside = (labels[b] >= start) & (labels[b] < stop)
                    picked = logits.gather(-1, (labels[b] - start).clamp(0, stop - start - 1)[..., None])[..., 0]
                    label_logit[b] += torch.where(inside, picked, 0.0)
    cross = [torch.zeros(lab.shape) for lab in labels]  # sum_v p_t(v) (t_v - s_v)
    if teacher is not None:
        for start, stop in chunks:
            student_logits = _chunk_logits(model, normed[0], (start, stop))
            for b, t in enumerate(_chunk_logits(teacher[0], normed[1], (start, stop))):
                cross[b] += ((t - lse[1][b][..., None]).exp() * (t - student_logits[b])).sum(-1)
    nll = kl = count = 0.0
    for b, batch in enumerate(batches):
        mask = batch.attention_mask
        valid = torch.ones(labels[b].shape) if mask is None else mask[:, 1:].float()
        nll += float(((lse[0][b] - label_logit[b]) * valid).sum())
        count += float(valid.sum())
        if teacher is not None:
            kl += float(((cross[b] + lse[0][b] - lse[1][b]) * valid).sum())
    loss = nll / count
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
    if teacher is not None:
        result["kl_to_teacher"] = kl / count
    return result
