"""Model heads: what sits on top of a family's layers, kept apart from the body so other heads can plug in.

A causal LM ends in a final norm and an LM head and is judged by next-token loss (or KL to a reference). An encoder
(masked LM, sentence embedding) or GPT-J brings its own head with the same two methods; depth scoring, streaming and
evaluation only call these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CausalLMHead:
    """Final norm + LM head of a decoder, and its next-token loss."""

    norm: nn.Module
    lm_head: nn.Module

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, H) last-layer output -> (B, S, V) logits. The normed states are cast to the head's dtype, as the
        models do (Mamba-2 keeps a float32 residual in front of a bf16 head)."""
        return self.lm_head(self.norm(hidden).to(self.lm_head.weight.dtype))

    @staticmethod
    def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None, metric: str,
                     reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed next-token loss (metric "lm_loss") or summed KL(reference || model) ("kl") over real tokens,
        a float32 scalar.

        `logits` (B, S-1, V) are the predictions at positions 0 .. S-2; `reference` is (log-probs, probs) of the
        same shape. The loss runs on a contiguous (B * (S-1), V) view: cross_entropy over a transposed (B, V, S-1)
        tensor takes about 3x longer on CPU, and with ~50 depth candidates per batch the loss is a visible part.
        """
        batch, steps, vocab = logits.shape
        logits = logits.float()
        valid = torch.ones_like(input_ids[:, 1:], dtype=torch.float32) if mask is None else mask[:, 1:].float()
        if metric == "lm_loss":
            nll = F.cross_entropy(logits.reshape(-1, vocab), input_ids[:, 1:].reshape(-1), reduction="none")
            return (nll.view(batch, steps) * valid).sum()
        ref_logprobs, ref_probs = reference
        kl = (ref_probs * (ref_logprobs - F.log_softmax(logits, dim=-1))).sum(-1)  # (B, S-1)
        return (kl * valid).sum()
