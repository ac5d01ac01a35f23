"""Eager PyTorch focal InfoNCE, written the way a user would: the full (B, B + H) logit matrix
and ``cross_entropy`` against the diagonal (sentence-transformers' MultipleNegativesRankingLoss
with hard negatives, plus the focal weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_infonce_loss(query, positive, negatives=None, *, temperature=0.01, gamma=1.0, detach_weight=False,
                       reduction="mean"):
    candidates = positive if negatives is None else torch.cat([positive, negatives])
    logits = query @ candidates.T / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    log_p = -F.cross_entropy(logits, labels, reduction="none")
    weight = (1 - log_p.exp()) ** gamma
    if detach_weight:
        weight = weight.detach()
    loss = -weight * log_p
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
