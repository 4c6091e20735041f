"""GradNAS importance: gradient scores of attention heads and FFN neurons through multiplicative unit masks.

Every layer's heads and FFN neurons get a mask of ones, applied by forward pre-hooks on the input of the attention
output projection (viewed as (..., heads, head_dim)) and of the FFN output projection; transformers 5 removed
`head_mask` and `prune_heads`, so hooks are the one way in that works for every family. A unit's score is the sum
over calibration batches of (dLoss/dmask)^2: the diagonal Fisher of the mask (Kwon et al. 2022, section 4.1), the
second-order estimate of the loss increase when the unit is removed.

The loss must have a non-zero gradient at mask = 1. A distance to the model's own unpruned outputs (KL or MSE to
itself) is at its minimum there, so its gradient is exactly zero and every score would be zero (tests show it);
none is offered. The named losses:
- `mlm`: masked-LM cross entropy (a model with an MLM head, e.g. BertForMaskedLM). 15% of each row's non-special,
  non-padding tokens (at least one) are replaced by [MASK], chosen by a torch.Generator seeded once. All of them
  become [MASK]: BERT's 80/10/10 rule eases the pretraining / fine-tuning mismatch in training, and would only add
  noise to a score.
- `causal_lm`: next-token cross entropy (GPT-J, llama-like decoders).
- `task`: the model's own loss on batches that carry `labels` (`LabeledBatch`, e.g. BertForSequenceClassification).
- `contrastive`: for a sentence encoder without an MLM head (MiniLM = BertModel + mean pooling): in-batch InfoNCE on
  the pairs (first half, second half) of each calibration window, the other rows being the negatives; mean pooling
  over the attention mask, cosine similarity / 0.05, symmetric cross entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.data import Batch
from llmprune.distributed import all_reduce_sum
from llmprune.export.encoder import FAMILIES
from llmprune.progress import progress

TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale of 20
MLM_RATE = 0.15


@dataclass(frozen=True)
class MaskSites:
    """Where a family's masks go, relative to `model.base_model`.

    The head count is `config.num_attention_heads` (query heads under GQA: the attention output projection reads
    num_attention_heads x head_dim); head_dim is that projection's input width over the head count, because BERT and
    GPT-J configs have no head_dim.
    """

    layers: str  # the list of transformer layers
    attn_out: str  # attention output projection inside a layer; its input is (..., heads * head_dim)
    ffn_out: str  # FFN output projection inside a layer; its input is (..., neurons)


# from the per-layer export's module-name table, so scoring and export always know the same families and names
SITES = {family: MaskSites(names["layers"], names["o"], names["ffn_out"]) for family, names in FAMILIES.items()}

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class LabeledBatch(Batch):
    """A batch with labels: per row for a task head, per token for MLM (-100 = not scored)."""

    labels: torch.Tensor | None = None


# -- masks --------------------------------------------------------------------------------------------------------


def mask_sites(model: nn.Module) -> MaskSites:
    model_type = model.config.model_type
    if model_type not in SITES:
        raise ValueError(f"GradNAS has no mask sites for model_type '{model_type}'. Known: {', '.join(SITES)}.")
    return SITES[model_type]


def _scale_input(mask: torch.Tensor, group: int) -> Callable:
    """A forward pre-hook multiplying the input's last dim, seen as (units, group), by `mask` (units,).

    The product runs in at least float32 so that the mask's gradient (a sum over batch, tokens and group) is
    accumulated in float32 under bf16 models; at mask = 1 the round trip returns the input bit for bit.
    """

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (..., units * group)
        dtype = torch.promote_types(x.dtype, torch.float32)
        scaled = x.to(dtype).unflatten(-1, (mask.numel(), group)) * mask.to(dtype)[:, None]  # (..., units, group)
        return (scaled.flatten(-2).to(x.dtype), *args[1:])

    return hook


@contextmanager
def unit_masks(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Float32 masks of ones, `{"heads.{i}": (heads,), "ffn.{i}": (neurons,)}`, applied while the context is open.

    The masks are leaves with requires_grad; differentiate a loss with respect to them, or edit them in place under
    torch.no_grad() to scale units. The hooks are removed on exit.
    """
    sites = mask_sites(model)
    heads = model.config.num_attention_heads
    masks: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for i, layer in enumerate(model.base_model.get_submodule(sites.layers)):
            attn_out, ffn_out = layer.get_submodule(sites.attn_out), layer.get_submodule(sites.ffn_out)
            head_dim, rest = divmod(attn_out.in_features, heads)
            assert rest == 0, f"layer {i}: {sites.attn_out} reads {attn_out.in_features} features, not {heads} heads"
            device = attn_out.weight.device
            masks[f"heads.{i}"] = torch.ones(heads, device=device, requires_grad=True)
            masks[f"ffn.{i}"] = torch.ones(ffn_out.in_features, device=device, requires_grad=True)
            handles.append(attn_out.register_forward_pre_hook(_scale_input(masks[f"heads.{i}"], head_dim)))
            handles.append(ffn_out.register_forward_pre_hook(_scale_input(masks[f"ffn.{i}"], 1)))
        yield masks
    finally:
        for handle in handles:
            handle.remove()


# -- losses -------------------------------------------------------------------------------------------------------


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mask_of(batch: Batch) -> torch.Tensor:
    return torch.ones_like(batch.input_ids) if batch.attention_mask is None else batch.attention_mask


def mask_tokens(batch: Batch, mask_token_id: int, special_token_ids: Sequence[int],
                generator: torch.Generator) -> LabeledBatch:
    """`batch` with MLM_RATE of each row's maskable tokens (at least one) replaced by `mask_token_id`; labels hold
    the original ids there and -100 elsewhere. Special tokens and padding are never masked."""
    ids, attention = batch.input_ids, _mask_of(batch)
    special = torch.tensor(list(special_token_ids), dtype=ids.dtype, device=ids.device)
    eligible = attention.bool() & ~torch.isin(ids, special)  # (B, S)
    draw = torch.rand(ids.shape, generator=generator).masked_fill(~eligible.cpu(), 2.0).to(ids.device)  # (B, S)
    rank = draw.argsort(dim=1).argsort(dim=1)  # position of each token in its row's random order
    count = (eligible.sum(dim=1, keepdim=True) * MLM_RATE).round().clamp(min=1)  # (B, 1)
    chosen = eligible & (rank < count)
    return LabeledBatch(ids.masked_fill(chosen, mask_token_id), batch.attention_mask, ids.masked_fill(~chosen, -100))


def mlm_loss(model: nn.Module, batch: LabeledBatch) -> torch.Tensor:
    """Cross entropy of the MLM head's logits on the tokens whose label is not -100 (see `mask_tokens`)."""
    device = _device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=_mask_of(batch).to(device))
    if getattr(out, "logits", None) is None:
        raise ValueError(f"loss='mlm' needs a model with an MLM head (e.g. BertForMaskedLM); {type(model).__name__} "
                         "returns no logits. For a sentence encoder use loss='contrastive'.")
    return F.cross_entropy(_upcast(out.logits).transpose(1, 2), batch.labels.to(device), ignore_index=-100)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross entropy; targets that are padding are not scored."""
    device = _device(model)
    ids, attention = batch.input_ids.to(device), _mask_of(batch).to(device)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]  # (B, S-1, V)
    targets = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    return F.cross_entropy(_upcast(logits).transpose(1, 2), targets, ignore_index=-100)


def task_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on `batch.labels` (a task head: sequence classification, token classification...)."""
    labels = getattr(batch, "labels", None)
    if labels is None:
        raise ValueError("loss='task' needs batches with labels: LabeledBatch(input_ids, attention_mask, labels).")
    device = _device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=_mask_of(batch).to(device),
                labels=labels.to(device))
    if out.loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for the given labels; use a model with a task head.")
    return out.loss


def contrastive_pairs(batch: Batch, cls_token_id: int | None = None,
                      sep_token_id: int | None = None) -> tuple[Batch, Batch]:
    """(anchor, positive): the first and second half of each window, each wrapped in [CLS] ... [SEP] when both ids
    are given (a BERT encoder expects them; packed calibration windows carry none)."""
    half = batch.input_ids.shape[1] // 2
    ids, attention = batch.input_ids, _mask_of(batch)

    def wrap(part_ids: torch.Tensor, part_mask: torch.Tensor) -> Batch:
        if cls_token_id is None or sep_token_id is None:
            return Batch(part_ids, part_mask)
        rows = part_ids.shape[0]
        cls, sep = part_ids.new_full((rows, 1), cls_token_id), part_ids.new_full((rows, 1), sep_token_id)
        ones = part_mask.new_ones(rows, 1)
        return Batch(torch.cat([cls, part_ids, sep], dim=1), torch.cat([ones, part_mask, ones], dim=1))

    return wrap(ids[:, :half], attention[:, :half]), wrap(ids[:, half:], attention[:, half:])


def mean_pooled(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, H) mean of the last hidden states over real tokens (sentence-transformers pooling), float32 or wider."""
    device = _device(model)
    attention = _mask_of(batch).to(device)
    hidden = _upcast(model.base_model(input_ids=batch.input_ids.to(device), attention_mask=attention)
                     .last_hidden_state)  # (B, S, H)
    weights = attention.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, H)


def contrastive_loss(model: nn.Module, batch: Batch, cls_token_id: int | None = None,
                     sep_token_id: int | None = None, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between mean-pooled halves of each window (see `contrastive_pairs`)."""
    rows = batch.input_ids.shape[0]
    if rows < 2:
        raise ValueError(f"loss='contrastive' needs at least 2 rows per batch (the other rows are the negatives), "
                         f"got {rows}; raise the calibration batch size.")
    anchor, positive = contrastive_pairs(batch, cls_token_id, sep_token_id)
    a = F.normalize(mean_pooled(model, anchor), dim=-1)  # (B, H)
    p = F.normalize(mean_pooled(model, positive), dim=-1)  # (B, H)
    similarity = a @ p.T / temperature  # (B, B), positives on the diagonal
    target = torch.arange(rows, device=similarity.device)
    return (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target)) / 2


LOSSES = ("mlm", "causal_lm", "task", "contrastive")


def resolve_loss(loss: str | LossFn, batches: Sequence[Batch], tokenizer=None,
                 seed: int = 0) -> tuple[LossFn, list[Batch]]:
    """The loss function for `loss` and the batches it reads (MLM masks them here, once, so that each batch's
    masked positions are fixed). `tokenizer` supplies the [MASK], [CLS], [SEP] and special ids."""
    if callable(loss):
        return loss, list(batches)
    if loss == "mlm":
        if tokenizer is None or getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("loss='mlm' needs a tokenizer with a mask token (pass tokenizer=...).")
        generator = torch.Generator().manual_seed(seed)
        return mlm_loss, [mask_tokens(b, tokenizer.mask_token_id, tokenizer.all_special_ids, generator)
                          for b in batches]
    if loss == "contrastive":
        cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        return partial(contrastive_loss, cls_token_id=cls, sep_token_id=sep), list(batches)
    if loss == "causal_lm":
        return causal_lm_loss, list(batches)
    if loss == "task":
        return task_loss, list(batches)
    raise ValueError(f"Unknown GradNAS loss '{loss}'. Known: {', '.join(LOSSES)}, or a callable (model, batch).")


# -- scores -------------------------------------------------------------------------------------------------------


def gradnas_scores(model: nn.Module, batches: Sequence[Batch], loss: str | LossFn, tokenizer=None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """GradNAS scores: per unit, the sum over batches of (dLoss/dmask)^2 at mask = 1, in float32 on the CPU.

    Args:
        model: a transformers model of a family in SITES.
        batches: calibration batches (this rank's share under torchrun; scores are summed over ranks).
        loss: one of LOSSES, or a callable (model, batch) -> scalar loss.
        tokenizer: needed by 'mlm' (mask and special ids); gives 'contrastive' its [CLS] / [SEP] wrapping.
        seed: the MLM masking seed.

    Returns:
        `{"heads.{i}": (num_attention_heads,), "ffn.{i}": (ffn_width,)}` for every layer i.
    """
    loss_fn, batches = resolve_loss(loss, batches, tokenizer, seed)
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: the score is the gradient of the deterministic model
    try:
        for p in params:
            p.requires_grad_(False)
        with unit_masks(model) as masks:
            names, leaves = list(masks), list(masks.values())
            totals = [torch.zeros_like(m) for m in leaves]
            for batch in progress(batches, desc="gradnas"):
                grads = torch.autograd.grad(loss_fn(model, batch), leaves, allow_unused=True)
                for total, grad in zip(totals, grads, strict=True):
                    if grad is not None:  # a unit the loss never reads (e.g. a head model ignoring the last layer)
                        total += grad.float().square()
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: all_reduce_sum(total).cpu() for name, total in zip(names, totals, strict=True)}
