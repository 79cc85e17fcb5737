"""Summed cross-entropy of the frozen vocabulary head, computed a few rows at a time with its gradient.

Training scores hundreds of positions per micro-batch against a vocabulary of 32000: as separate steps
(head matmul, log_softmax, nll_loss) that is a [N, vocab] logits tensor, its log-softmax, and a zero-filled
[N, vocab] gradient in backward, about a fifth of a CPU training step (bench.train's profile). Here each
chunk of rows goes head -> max -> exp -> sum -> loss -> softmax minus one-hot (the logits' gradient, in place) ->
gradient of the hidden states, while the chunk is still in cache; backward only scales the stored
gradient. The head must be frozen: its weight gets no gradient.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 128  # 16 MB of float32 logits at vocab 32000: fewest passes over the head's weight that stay fast


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_rows: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.t()).float()
            picked = targets[rows, None]
            largest = logits.amax(dim=-1, keepdim=True)
            shifted_target = logits.gather(1, picked) - largest
            exps = logits.sub_(largest).exp_()  # in place: the chunk is read and written a few times, never copied
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() - shifted_target).sum()
            if want_grad:
                probabilities = exps.div_(sums)
                probabilities.scatter_add_(1, picked, probabilities.new_full(picked.shape, -1.0))
                grad[rows] = probabilities.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """sum_n cross_entropy(hidden[n] @ weight.T, targets[n]) as a float32 scalar, differentiable in `hidden`.

    `hidden` [N, dim], `weight` [vocab, dim] (frozen), `targets` [N] token ids.
    """
    _check(hidden, weight, targets)
    if weight.requires_grad:
        raise ValueError("head_cross_entropy: the head weight is trainable; this loss gives it no gradient")
    return _HeadCrossEntropy.apply(hidden, weight, targets, chunk_rows)


@torch.no_grad()
def head_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each row [N] float32, whether its target is the most likely token [N] bool), without
    gradients and without an [N, vocab] tensor: what evaluation reports per token."""
    _check(hidden, weight, targets)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hits = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        losses[rows], hits[rows] = logit_scores((hidden[rows] @ weight.t()).float(), targets[rows])
    return losses, hits


def logit_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_scores` of logits already computed [N, vocab]: each row's cross-entropy and whether its target is
    the most likely token."""
    losses = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
    return losses, logits.argmax(dim=-1) == targets


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"head_cross_entropy: hidden {tuple(hidden.shape)} and head weight {tuple(weight.shape)} "
                         "do not fit ([N, dim] and [vocab, dim])")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"head_cross_entropy: targets must be a LongTensor [{hidden.shape[0]}], got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"head_cross_entropy: target ids must be in [0, {weight.shape[0]}), got "
                         f"{int(targets.min())}..{int(targets.max())}")
