"""Memory-lean causal-LM loss: logits only where labels exist, in chunks, never kept, fp32 cross-entropy.

The naive loss builds logits [B, T, V]: for Llama 3 (V = 128256) at B=2, T=2048 that is 525M floats, 2.1 GB in
fp32 plus the same again for its gradient, more than the whole 4-bit 3B model. Completion-only training
supervises only the answer tokens (typically a few percent of T), so we gather those hidden states first and
apply lm_head to them alone, `chunk` rows at a time.

LinearCrossEntropy is one autograd function for lm_head + cross-entropy. Forward keeps, per supervised row, only
its hidden state and one number, the log-sum-exp of its logits; backward recomputes each chunk's logits and turns
them into their own gradient in place (softmax minus one-hot, times the incoming gradient), so the only large
tensor alive is one chunk's fp32 logits (chunk x V x 4 bytes, plus a compute-dtype copy under bf16/fp16:
1024 x 128256 x 6 B = 752 MiB at the default chunk). Autograd through F.cross_entropy would hold the logits, the
fp32 copy, log-softmax and two fp32 gradients at once (14 bytes per logit in bf16, 16 in fp32). The price is the
same as checkpointing the chunk: one extra lm_head matmul over the supervised rows in backward. The idea is the
one of fused linear cross-entropy kernels (Liger Kernel; Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
Language Models"), written here in plain torch ops.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE = -100
LOSS_CHUNK = 1024  # supervised rows per lm_head/cross-entropy chunk: 1024 x V fp32 logits alive at a time


def supervised_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (label of the *next* token is not IGNORE)."""
    return int((labels[:, 1:] != IGNORE).sum())


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ weight.T, y_i) over rows of h, in fp32, `chunk` rows at a time, without keeping logits.

    h: (N, H), weight: (V, H) (lm_head's, no bias), y: (N,) class ids; dtype: the matmul dtype (the autocast
    dtype, or the weight's). Matmuls run in `dtype` and the softmax in fp32, as autocast would run lm_head and a
    fp32 cross-entropy; the weight gradient is computed only when the weight is trainable (a frozen base in
    QLoRA, so normally never). per_row: return the (N,) cross-entropies instead of their sum, each with its own
    incoming gradient (engine.channel_train sums them per candidate, then takes a softmax over candidates).
    It runs eagerly (the loss is outside Block.set_compiled's regions); its forward writes its own buffers in place,
    the pattern torch 2.11's AOT autograd traced wrong in the RMSNorm (model.llama._RMSNormFn): check that before
    compiling it.
    """

    @staticmethod
    def forward(ctx, h, weight, y, chunk: int, dtype: torch.dtype, row_weight=None, per_row: bool = False):
        assert h.dim() == 2 and y.shape == h.shape[:1] and weight.shape[1] == h.shape[1], (h.shape, weight.shape)
        assert row_weight is None or row_weight.shape == y.shape
        assert not (per_row and (row_weight is not None or h.shape[0] == 0)), "per-row: unweighted, some rows"
        w = weight.to(dtype)  # no copy when lm_head is already in the compute dtype
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = []
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk):
                logits = (h[i:i + chunk].to(dtype) @ w.T).float()  # (c, V) fp32
                target = logits.gather(1, y[i:i + chunk, None]).squeeze(1)
                m = logits.amax(1)
                # log-sum-exp in place (torch.logsumexp would allocate a second (c, V) buffer)
                lse[i:i + chunk] = m + logits.sub_(m[:, None]).exp_().sum(1).log()
                ce = lse[i:i + chunk] - target
                if per_row:
                    rows.append(ce)
                else:
                    total += (ce * row_weight[i:i + chunk] if row_weight is not None else ce).sum()
                del logits
        ctx.save_for_backward(h, weight, y, lse, row_weight)
        ctx.chunk, ctx.dtype, ctx.per_row = chunk, dtype, per_row
        return torch.cat(rows) if per_row else total

    @staticmethod
    def backward(ctx, grad):
        h, weight, y, lse, row_weight = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        g = grad.float()
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk):
                hc = h[i:i + chunk].to(dtype)
                p = (hc @ w.T).float()  # (c, V) recomputed logits -> softmax -> d loss / d logits, all in place
                p.sub_(lse[i:i + chunk, None]).exp_()
                p[torch.arange(p.shape[0], device=p.device), y[i:i + chunk]] -= 1.0
                if ctx.per_row:
                    p.mul_(g[i:i + chunk, None])
                else:
                    p.mul_(g if row_weight is None else g * row_weight[i:i + chunk, None])
                gp = p.to(dtype)  # the matmuls in the compute dtype, as autograd under autocast would run them
                del p
                if gh is not None:
                    gh[i:i + chunk] = gp @ w
                if gw is not None:
                    gw += (gp.T @ hc).float()
                del gp
        return gh, (gw.to(weight.dtype) if gw is not None else None), None, None, None, None, None


def matmul_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """What nn.Linear would multiply in here: the autocast dtype when autocast is on, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def supervised_weight(labels: torch.Tensor, loss_weights: torch.Tensor | None) -> float:
    """What a batch's summed loss is divided by: its supervised tokens, or the sum of its loss weights."""
    if loss_weights is None:
        return float(supervised_tokens(labels))
    return float(loss_weights[:, 1:][labels[:, 1:] != IGNORE].double().sum())


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk: int = LOSS_CHUNK,
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions, as an fp32 scalar.

    hidden: (B, T, H) final-normed hidden states; labels: (B, T) with IGNORE where there is nothing to learn.
    Position t predicts labels[t + 1] (the usual causal shift). lm_head must be a plain bias-free nn.Linear.
    loss_weights (B, T) float, aligned with labels: each supervised token's cross-entropy is multiplied by it
    (data.batch.answer_weights; None = weight 1 for every token).
    """
    assert type(lm_head) is nn.Linear and lm_head.bias is None, type(lm_head)
    y = labels[:, 1:]  # (B, T-1)
    mask = y != IGNORE
    h = hidden[:, :-1][mask]  # (B, T-1, H) -> (N, H): only supervised rows, a copy of N x H
    y = y[mask]  # (N,)
    if y.numel() == 0:
        # keep the graph connected so DDP's gradient hooks still fire on a rank with nothing supervised
        return hidden.float().sum() * 0.0
    w = loss_weights[:, 1:][mask].float() if loss_weights is not None else None  # (N,)
    return LinearCrossEntropy.apply(h, lm_head.weight, y, chunk, matmul_dtype(h.device, lm_head.weight), w)


class CausalLMLoss(nn.Module):
    """model -> summed loss, as one module so DDP's forward (and its gradient hooks) wraps the whole step."""

    def __init__(self, model: nn.Module, chunk: int = LOSS_CHUNK):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, loss_weights=None) -> torch.Tensor:
        hidden = self.model.hidden(input_ids, position_ids=position_ids, segment_ids=segment_ids)  # (B, T, H)
        return chunked_ce_sum(hidden, labels, self.model.lm_head, self.chunk, loss_weights)


def backward_scale(n_tokens_global: float, world_size: int) -> float:
    """Factor that turns a micro-batch's summed loss into its share of the step's mean loss, for backward.

    We want the gradient of  sum_over_ranks_and_micro_batches(loss_sum) / n_tokens_global,  where
    n_tokens_global is the supervised-token count of the whole optimizer step, all-reduced over ranks before any
    backward. Dividing each micro-batch's sum by that one global count (instead of averaging per micro-batch)
    makes the gradient independent of how tokens fall into micro-batches and ranks. DDP, however, *averages*
    gradients over ranks (divides the all-reduced sum by world_size), so each rank multiplies by world_size
    to cancel that division.
    """
    return world_size / max(n_tokens_global, 1)
