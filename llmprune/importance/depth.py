"""Depth importance by removal: how much the LM loss (or KL to the full model) rises without some layers.

A straightforward search re-runs the whole model once per candidate. Here one forward pass records every
layer's input and the keyword arguments the backbone hands each layer (masks, rotary embeddings); a candidate
that removes layers [s, s + k) then restarts from layer s's recorded input and runs only layers s + k onward,
and all candidates of a batch share that one recording. Minitron (arXiv:2408.11796 Sec. 3) compares drop-one
LM loss with contiguous-block removal; both come from this pass.

Under pipeline parallelism (megatron) every stage records its own layers' inputs and all stages walk the same
candidate list: the stage holding layer s restarts from its recording, each stage runs its layers from s + k on and
hands the hidden states to the next, and the last stage computes the loss; the totals are summed over the stages.
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


def _resume(layers: dict, recorded: dict, start: int, stop: int, stages: Stages) -> torch.Tensor | None:
    """Layers `stop` onward on layer `start`'s recorded input (layers start .. stop - 1 removed). Each stage runs its
    own of them and hands the hidden states on; the last stage returns the last layer's output, the others None."""
    first = stages.stage_of(start)
    if stages.stage < first:
        return None
    hidden = recorded[start] if stages.stage == first else stages.recv_prev()
    for j, layer in layers.items():
        if j >= stop:
            out = layer(hidden, **recorded[("kwargs", j)])
            hidden = out[0] if isinstance(out, tuple) else out
    if stages.last:
        return hidden
    stages.send_next(hidden)
    return None


@torch.no_grad()
def removal_scores(model, adapter, batches: Iterable[Batch], metric: str = "lm_loss", drop_one: bool = True,
                   block_sizes: tuple[int, ...] = (), total: int | None = None) -> dict[str, torch.Tensor]:
    """Loss increase per candidate removal, averaged over real tokens.

    Returns:
        `depth.drop_one.{metric}` (layers,) when drop_one, and `depth.contiguous.{metric}.n{k}` (layers - k + 1,)
        for each k in block_sizes; entry s of the latter removes layers s .. s + k - 1.
    """
    stages = layer_stages(adapter)  # one stage unless megatron pipeline parallelism splits the layers
    layers = dict(zip(stages.layer_ids, adapter.layers))  # global index -> this stage's layer
    num_layers = stages.num_layers
    group = getattr(adapter, "data_parallel_group", None)  # megatron TP / PP: ranks of one model share their samples
    seq_first = getattr(adapter, "seq_first", False)  # megatron-core: hidden states are (S, B, H)
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
            for c, (start, size) in enumerate(candidates):
                hidden = _resume(layers, recorded, start, start + size, stages)
                if hidden is not None:  # the last stage
                    hidden = hidden.transpose(0, 1) if seq_first else hidden  # (B, S, H)
                    sums[c] += token_losses(adapter.logits(hidden[:, :-1]), input_ids, mask, metric, teacher)
            recorded.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    sums, base_sum, tokens = (stages.sum(all_reduce_sum(t, group)) for t in (sums, base_sum, tokens))
    return named_removal_scores(((sums - base_sum) / tokens).cpu(), num_layers, metric, drop_one, block_sizes)


def named_removal_scores(increase: torch.Tensor, num_layers: int, metric: str, drop_one: bool,
                         block_sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Split the per-candidate loss increase (drop-one candidates first, then each block size's starts) into the
    named score vectors."""
    out, offset = {}, 0
    if drop_one:
        out[f"depth.drop_one.{metric}"] = increase[:num_layers]
        offset = num_layers
    for k in block_sizes:
        out[f"depth.contiguous.{metric}.n{k}"] = increase[offset: offset + num_layers - k + 1]
        offset += num_layers - k + 1
    return out
