"""Eager loss-based reweighting (P15), written the way a user would: token cross-entropy with
``reduction="none"`` reshaped to (B, T), per-sequence means, then the weight formula in torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_sequence_ce(logits, labels, weights=None, *, scale=1.0, shift=True, ignore_index=-100,
                         reduction="sum"):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    token = F.cross_entropy(logits.reshape(b * t, v).float(), labels.reshape(b * t).long(),
                            ignore_index=ignore_index, reduction="none").view(b, t)
    n = (labels != ignore_index).sum(1)
    seq = torch.where(n > 0, token.sum(1) / n.clamp_min(1), token.new_zeros(b))
    terms = scale * seq if weights is None else scale * weights.float() * seq
    if reduction == "none":
        out = terms
    elif reduction == "sum":
        out = terms.sum()
    else:
        out = terms.sum() / (n > 0).sum()
    return out.to(logits.dtype)


def loss_reweight_weights(losses, active=None, *, strategy="linupper", delta=1.0, temperature=1.0,
                          readme_uniform=False):
    x = losses.detach().float()
    act = torch.ones_like(x, dtype=torch.bool) if active is None else active
    lo = torch.where(act, x, torch.inf).min() if x.numel() else x.new_zeros(())
    hi = torch.where(act, x, -torch.inf).max() if x.numel() else x.new_zeros(())
    norm = delta * ((x - lo) + (x - hi)) / torch.clamp(hi - lo, min=1e-6)
    if strategy == "linupper":
        f = torch.clamp(norm + delta, max=delta)
    elif strategy == "quadratic":
        f = 1 - norm**2 / delta**2
    elif strategy == "extremes":
        f = norm.abs()
    else:
        f = norm if readme_uniform else torch.zeros_like(norm)
    w = torch.softmax(torch.where(act, f / temperature, -torch.inf), dim=0)
    return torch.where(act, w, torch.zeros_like(w)).to(losses.dtype)
