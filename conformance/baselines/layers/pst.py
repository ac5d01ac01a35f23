"""Eager PyTorch PST, written the way the authors' ``SparseLinear`` does it: the low-rank update and
the scores as separate ops, an ``argsort`` (stable here, to match the specified tie rule) behind a
straight-through ``autograd.Function``, the mask multiplied in, then ``F.linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SparseBinarizer(torch.autograd.Function):
    """0 on the ``int(sparsity * numel)`` smallest scores, 1 elsewhere; the gradient passes straight
    through to the scores."""

    @staticmethod
    def forward(ctx, scores, sparsity):
        num_prune = int(sparsity * scores.numel())
        prune = torch.argsort(scores.reshape(-1), stable=True)[:num_prune]
        mask = torch.ones_like(scores)
        mask.reshape(-1)[prune] = 0.0
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def pst_sparse_linear(x, weight, bias, U, V, A, B, R, C, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0):
    w_prime = weight + beta * (U @ V)
    scores = w_prime.abs() + alpha1 * (A @ B) + alpha2 * (R.unsqueeze(1) + C.unsqueeze(0))
    mask = _SparseBinarizer.apply(scores, sparsity)
    return F.linear(x, mask * w_prime, bias)


def cubic_sparsity_schedule(step, total_steps, *, initial_sparsity=0.0, final_sparsity=0.9, initial_warmup=0.1,
                            final_warmup=0.3, frequency=1):
    """The authors' ``schedule_sparsity_ratio`` applied to every step of an integer tensor."""
    s = step.to(torch.float64)
    start = initial_warmup * total_steps
    span = total_steps - (final_warmup + initial_warmup) * total_steps
    progress = (s - start) if frequency == 1 else torch.floor((s - start) / frequency) * frequency
    cubic = final_sparsity + (initial_sparsity - final_sparsity) * (1 - progress / span) ** 3
    out = torch.where(s <= start, initial_sparsity,
                      torch.where(s > total_steps - final_warmup * total_steps, final_sparsity, cubic))
    return out.to(torch.float32)
