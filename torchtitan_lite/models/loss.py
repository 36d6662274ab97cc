"""Token cross-entropy, summed: the caller divides by the global count of valid targets.

Summing (not averaging) per micro-batch lets gradient accumulation and data parallelism
normalize once by the number of valid targets across all micro-batches and ranks, so a
micro-batch with more padding does not weigh more than its share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

#: Label of a position that trains nothing (padding, prompts, the target after a document's
#: eos); the data pipeline writes it, the losses skip it.
IGNORE_INDEX = -100


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of token losses over valid labels; ``(B, S, V)`` logits, ``(B, S)`` labels."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels)`` without the ``(N, V)`` logits.

    ``hidden`` ``(N, D)``, ``weight`` ``(V, D)`` (the output projection), ``labels`` ``(N,)``.
    The rows go through in chunks: each chunk's fp32 logits give its loss and, when a
    gradient is wanted, at once its gradients (softmax − one-hot, times the weight or the
    hidden rows), so no logits outlive their chunk and the backward only scales the stored
    gradients. The same matmuls as logits + cross-entropy (one forward, two backward), with
    no full-vocabulary log-softmax pass, its gradient or a zero-filled ``(N, V)`` buffer.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels)
    return _chunks(hidden, weight, labels, want_grads=False)[0]


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: 16 MiB of fp32 logits (cache-sized on a CPU; 1,820 rows of the debug
    vocabulary), at least 256 rows so a 128K vocabulary still makes large matmuls."""
    return max(256, (4 << 20) // vocab)


def _chunks(hidden: Tensor, weight: Tensor, labels: Tensor, want_grads: bool):
    """The summed loss and, with ``want_grads``, d loss / d hidden and d loss / d weight."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
    )
    rows = _chunk_rows(weight.shape[0])
    starts = range(0, hidden.shape[0], rows)
    if is_fake(hidden) and not torch.compiler.is_compiling():
        starts = starts[:1]  # the dry run: each chunk allocates what the first did, and frees it
    for start in starts:
        h, y = hidden[start : start + rows], labels[start : start + rows]
        logits = (h @ weight.t()).float()  # (n, V)
        lse = logits.logsumexp(-1)
        valid = y != IGNORE_INDEX
        target = y.clamp(min=0)[:, None]
        loss += ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
        if not want_grads:
            continue
        # d loss / d logits = softmax − one-hot on valid rows, 0 on ignored ones
        grad = logits.sub_(lse[:, None]).exp_()
        grad.scatter_add_(1, target, -valid[:, None].to(grad.dtype))
        grad.mul_(valid[:, None])
        grad = grad.to(hidden.dtype)
        torch.mm(grad, weight, out=grad_hidden[start : start + rows])
        if grad_weight.dtype == grad.dtype:
            grad_weight.addmm_(grad.t(), h)
        else:  # low-precision activations: accumulate the chunks in fp32
            grad_weight += (grad.t() @ h).float()
    if want_grads:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        loss, grad_hidden, grad_weight = _chunks(hidden, weight, labels, want_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None
