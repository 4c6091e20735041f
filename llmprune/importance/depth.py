"""Depth importance by removal: how much the LM loss (or KL to the full model) rises without some layers.

A straightforward search re-runs the whole model once per candidate. Here one forward pass records every
layer's input and the keyword arguments the backbone hands each layer (masks, rotary embeddings); a candidate
that removes layers [s, s + k) then restarts from layer s's recorded input and runs only layers s + k onward,
and all candidates of a batch share that one recording. Minitron (arXiv:2408.11796 Sec. 3) compares drop-one
LM loss with contiguous-block removal; both come from this pass.

The candidates do not run one after another: they run as one wavefront, stacked along the batch dimension. At layer
j the stack holds every candidate already past its removed block (drop-one: j of them), so each layer runs once per
batch on a batch of up to layers x B sequences instead of up to `layers` times on B: the same arithmetic in fewer,
larger matrix products (on SmolLM2, 30 candidates, CPU: ~20% less time in the layers; more where small batches leave
an accelerator idle). Every candidate's rows see exactly its own computation, so the scores are those of the
one-at-a-time walk up to float32 rounding. The stack is capped by CANDIDATE_BATCH_BYTES of hidden states (a large
model's candidates run one at a time, as before).

Under pipeline parallelism (megatron) every stage records its own layers' inputs and all stages walk the same
candidate list: the stage holding layer s restarts from its recording, each stage runs its layers from s + k on and
hands the hidden states to the next, and the last stage computes the loss; the totals are summed over the stages.
megatron-core candidates run one at a time (its masks and rotary tables are not laid out batch-first).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from llmprune.adapters.heads import CausalLMHead
from llmprune.data import Batch
from llmprune.distributed import Stages, all_reduce_sum, layer_stages
from llmprune.progress import progress

token_losses = CausalLMHead.token_losses  # the head's next-token loss (or KL), summed over real tokens

# Hidden states of the candidates stacked through one layer: SmolLM2 (4 x 256 tokens, 576 wide, float32: 2.4 MB each)
# runs all its 30 drop-one candidates together (the layer's own activations, ~10x the hidden states, come on top);
# an 8B model's 4 x 4096-token batch (134 MB in bf16) runs one candidate at a time.
CANDIDATE_BATCH_BYTES = 256 * 2**20


def _tile(value, copies: int, batch: int):
    """A layer keyword argument for `copies` stacked copies of a batch of `batch` sequences: tensors whose first
    dimension is the batch (padding masks (B, 1, S, S) or (B, S), rotary tables (B, S, hd), position ids) are
    repeated; the rest (None, flags, (S,) cache positions, tables shared by the batch) pass as they are."""
    if torch.is_tensor(value):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, copies, batch) for v in value)
    return value


def _walk(
    layers: dict,
    recorded: dict,
    candidates: list[tuple[int, int]],
    group: list[int],
    stages: Stages,
    batch: int,
    batch_dim: int,
) -> list[torch.Tensor] | None:
    """The candidates `group` (indices into `candidates`, (start, size) each) through this stage's layers, stacked.

    A candidate enters at its start layer with that layer's recorded input and runs every layer from start + size on;
    those that entered on an earlier stage arrive from the previous stage, stacked in group order along `batch_dim`.
    Returns on the last stage each candidate's last-layer output, in group order; hands the stack on and returns None
    elsewhere.
    """
    states: dict[int, torch.Tensor] = {}
    carried = [c for c in group if stages.stage_of(candidates[c][0]) < stages.stage]
    if carried:
        states.update(zip(carried, stages.recv_prev().split(batch, dim=batch_dim)))
    for j, layer in layers.items():
        states.update({c: recorded[j] for c in group if candidates[c][0] == j})
        running = [c for c in group if c in states and j >= sum(candidates[c])]
        if not running:
            continue
        kwargs = recorded[("kwargs", j)]
        if len(running) > 1:
            kwargs = {k: _tile(v, len(running), batch) for k, v in kwargs.items()}
        hidden = states[running[0]] if len(running) == 1 else torch.cat([states[c] for c in running], dim=batch_dim)
        out = layer(hidden, **kwargs)  # (n * B, S, H)
        out = out[0] if isinstance(out, tuple) else out
        states.update(zip(running, out.split(batch, dim=batch_dim)))
    present = [states[c] for c in group if c in states]
    if stages.last:
        return present
    if present:  # else every candidate of the group starts on a later stage
        stages.send_next(torch.cat(present, dim=batch_dim))
    return None


def _groups(candidates: list[tuple[int, int]], per_pass: int) -> list[list[int]]:
    """Candidate indices in order of the layer they resume at, `per_pass` at a time: a group's stack then grows by
    one candidate per layer and the early layers run few rows."""
    order = sorted(range(len(candidates)), key=lambda c: (sum(candidates[c]), candidates[c][0]))
    return [order[i : i + per_pass] for i in range(0, len(order), per_pass)]


@torch.no_grad()
def removal_scores(
    model,
    adapter,
    batches: Iterable[Batch],
    metric: str = "lm_loss",
    drop_one: bool = True,
    block_sizes: tuple[int, ...] = (),
    total: int | None = None,
    candidates_per_pass: int | None = None,
) -> dict[str, torch.Tensor]:
    """Loss increase per candidate removal, averaged over real tokens.

    Args:
        candidates_per_pass: candidates stacked through each layer together; None: as many as CANDIDATE_BATCH_BYTES
            of hidden states allow (1 for megatron-core models). 1 runs them one after another. Any value gives the
            same scores up to float32 rounding.

    Returns:
        `depth.drop_one.{metric}` (layers,) when drop_one, and `depth.contiguous.{metric}.n{k}` (layers - k + 1,)
        for each k in block_sizes; entry s of the latter removes layers s .. s + k - 1.
    """
    stages = layer_stages(adapter)  # one stage unless megatron pipeline parallelism splits the layers
    layers = dict(zip(stages.layer_ids, adapter.layers))  # global index -> this stage's layer
    num_layers = stages.num_layers
    group = getattr(adapter, "data_parallel_group", None)  # megatron TP / PP: ranks of one model share their samples
    seq_first = getattr(adapter, "seq_first", False)  # megatron-core: hidden states are (S, B, H)
    if seq_first:
        assert candidates_per_pass in (None, 1), f"megatron-core candidates run one at a time: {candidates_per_pass}"
        candidates_per_pass = 1
    batch_dim = 1 if seq_first else 0
    device = next(model.parameters()).device
    candidates = [(i, 1) for i in range(num_layers)] if drop_one else []
    candidates += [(s, k) for k in block_sizes for s in range(num_layers - k + 1)]
    sums = torch.zeros(len(candidates), dtype=torch.float32, device=device)  # losses: the last stage's
    base_sum = torch.zeros((), dtype=torch.float32, device=device)
    tokens = torch.zeros((), dtype=torch.float32, device=device)
    recorded: dict = {}
    recording = [True]  # off while candidates re-run layers, so their inputs do not overwrite the recording

    def record_input(i):
        def fn(mod, args, kwargs):
            if not recording[0]:
                return
            recorded[i] = args[0] if args else kwargs["hidden_states"]
            # per layer: hybrids hand each layer type its own mask
            recorded[("kwargs", i)] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return fn

    handles = [layer.register_forward_pre_hook(record_input(i), with_kwargs=True) for i, layer in layers.items()]

    def record_output(mod, args, out):
        if recording[0]:
            recorded[num_layers] = out[0] if isinstance(out, tuple) else out

    if stages.last:  # the base loss starts from the last layer's output
        assert num_layers - 1 in layers, f"the last pipeline stage holds no layer: {stages.starts}"
        handles.append(layers[num_layers - 1].register_forward_hook(record_output))
    was_training = model.training
    model.eval()
    try:
        for batch in progress(batches, total=total, desc=f"depth ({len(candidates)} candidates)"):
            input_ids = batch.input_ids.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            recording[0] = True
            adapter.backbone(input_ids=input_ids, attention_mask=mask, use_cache=False)  # every stage its layers
            recording[0] = False
            teacher = None
            if stages.last:
                last = recorded[num_layers].transpose(0, 1) if seq_first else recorded[num_layers]  # (B, S, H)
                base_logits = adapter.logits(last[:, :-1])  # (B, S-1, V): position S-1 predicts nothing
                if metric == "kl":  # once per batch, shared by every candidate
                    teacher_logprobs = F.log_softmax(base_logits.float(), dim=-1)
                    teacher = (teacher_logprobs, teacher_logprobs.exp())
                base_sum += token_losses(base_logits, input_ids, mask, metric, teacher)
                tokens += input_ids[:, 1:].numel() if mask is None else mask[:, 1:].sum()
            per_pass = candidates_per_pass
            if per_pass is None:
                state = recorded[min(layers)]  # every stage records the same (B, S, H) size
                per_pass = max(1, CANDIDATE_BATCH_BYTES // (state.numel() * state.element_size()))
            rows = input_ids.shape[0]
            for members in _groups(candidates, per_pass):
                outputs = _walk(layers, recorded, candidates, members, stages, rows, batch_dim)
                for c, hidden in zip(members, outputs or []):  # None before the last stage
                    hidden = hidden.transpose(0, 1) if seq_first else hidden  # (B, S, H)
                    sums[c] += token_losses(adapter.logits(hidden[:, :-1]), input_ids, mask, metric, teacher)
            recorded.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    sums, base_sum, tokens = (stages.sum(all_reduce_sum(t, group)) for t in (sums, base_sum, tokens))
    return named_removal_scores(((sums - base_sum) / tokens).cpu(), num_layers, metric, drop_one, block_sizes)


def named_removal_scores(
    increase: torch.Tensor, num_layers: int, metric: str, drop_one: bool, block_sizes: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Split the per-candidate loss increase (drop-one candidates first, then each block size's starts) into the
    named score vectors."""
    out, offset = {}, 0
    if drop_one:
        out[f"depth.drop_one.{metric}"] = increase[:num_layers]
        offset = num_layers
    for k in block_sizes:
        out[f"depth.contiguous.{metric}.n{k}"] = increase[offset : offset + num_layers - k + 1]
        offset += num_layers - k + 1
    return out
