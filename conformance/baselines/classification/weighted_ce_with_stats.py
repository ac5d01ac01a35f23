"""Eager weighted cross-entropy with per-sample statistics (P55), written the way a user would:
``F.cross_entropy(reduction="none")`` plus separate softmax, entropy and top-2 passes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_ce_with_stats(logits, target, sample_weight, *, ignore_index=-100, reduction="mean"):
    active = target != ignore_index
    safe = torch.where(active, target, 0).long()
    ce = F.cross_entropy(logits, safe, reduction="none")
    w = torch.where(active, sample_weight, torch.zeros_like(sample_weight))
    weighted = torch.where(active, w * ce, torch.zeros_like(ce))
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        d = active.sum().to(weighted.dtype) if reduction == "mean" else w.sum()
        loss = torch.where(d != 0, weighted.sum() / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)
        p = log_p.exp()
        entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)
        max_prob = p.max(-1).values
        label_prob = p.gather(1, safe[:, None])[:, 0]
        other = p.scatter(1, safe[:, None], float("-inf")).max(-1).values.clamp_min(0.0)
        zero = torch.zeros_like(entropy)
        stats = [torch.where(active, s, zero) for s in (entropy, max_prob, label_prob, label_prob - other)]
    return (loss, *stats)
