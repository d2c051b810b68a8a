"""Memory-lean causal-LM loss: logits only where labels exist, in checkpointed chunks, fp32 cross-entropy.

The naive loss builds logits [B, T, V]: for Llama 3 (V = 128256) at B=2, T=2048 that is 525M floats, 2.1 GB in
fp32 plus the same again for its gradient, more than the whole 4-bit 3B model. Completion-only training
supervises only the answer tokens (typically a few percent of T), so we gather those hidden states first and
apply lm_head to them alone, `chunk` rows at a time. Each chunk runs under non-reentrant checkpointing, so
autograd keeps only the chunk's hidden rows and recomputes its logits in backward: the logits memory is bounded
by chunk x V (1024 x 128256 x 4 B = 525 MB at the default; lower --loss-chunk on small GPUs) no matter how many
tokens are supervised. The price is one extra lm_head matmul over the supervised rows in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def supervised_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (label of the *next* token is not IGNORE)."""
    return int((labels[:, 1:] != IGNORE).sum())


def _ce_chunk(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = lm_head(h).float()  # (n, H) -> (n, V), upcast: CE in fp16 loses the small probabilities
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions, as an fp32 scalar.

    hidden: (B, T, H) final-normed hidden states; labels: (B, T) with IGNORE where there is nothing to learn.
    Position t predicts labels[t + 1] (the usual causal shift).
    """
    y = labels[:, 1:]  # (B, T-1)
    mask = y != IGNORE
    h = hidden[:, :-1][mask]  # (B, T-1, H) -> (N, H): only supervised rows, a copy of N x H
    y = y[mask]  # (N,)
    if y.numel() == 0:
        # keep the graph connected so DDP's gradient hooks still fire on a rank with nothing supervised
        return hidden.float().sum() * 0.0
    total = None
    for i in range(0, y.numel(), chunk):
        part = checkpoint(_ce_chunk, lm_head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


class CausalLMLoss(nn.Module):
    """model -> summed loss, as one module so DDP's forward (and its gradient hooks) wraps the whole step."""

    def __init__(self, model: nn.Module, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None) -> torch.Tensor:
        hidden = self.model.hidden(input_ids, position_ids=position_ids, segment_ids=segment_ids)  # (B, T, H)
        return chunked_ce_sum(hidden, labels, self.model.lm_head, self.chunk)


def backward_scale(n_tokens_global: int, world_size: int) -> float:
    """Factor that turns a micro-batch's summed loss into its share of the step's mean loss, for backward.

    We want the gradient of  sum_over_ranks_and_micro_batches(loss_sum) / n_tokens_global,  where
    n_tokens_global is the supervised-token count of the whole optimizer step, all-reduced over ranks before any
    backward. Dividing each micro-batch's sum by that one global count (instead of averaging per micro-batch)
    makes the gradient independent of how tokens fall into micro-batches and ranks. DDP, however, *averages*
    gradients over ranks (divides the all-reduced sum by world_size), so each rank multiplies by world_size
    to cancel that division.
    """
    return world_size / max(n_tokens_global, 1)
