"""Eager PyTorch supervised contrastive loss, written the way a user would (after HobbitLong/SupContrast's
``SupConLoss``, with its fix for anchors without positives): the N x N logits and masks are
materialised, the logits in fp32."""

from __future__ import annotations

import torch


def supcon_loss(features, labels, *, temperature=0.07, base_temperature=0.07, reduction="mean"):
    n = features.shape[0]
    logits = (features @ features.T).float() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(dim=1)
    mean_log_prob_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(features.dtype)
