"""Eager ensemble cross-entropy (P24), written the way a user would: average the stacked member
logits (or the member probabilities) and call PyTorch's cross-entropy / NLL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ensemble_cross_entropy(logits, target, *, mode="logit_mean", temperature=1.0, ignore_index=-100,
                           reduction="mean"):
    target = target.long()
    if mode == "logit_mean":
        return F.cross_entropy(logits.mean(dim=0) / temperature, target, ignore_index=ignore_index,
                               reduction=reduction)
    log_mix = torch.logsumexp(torch.log_softmax(logits / temperature, dim=-1), dim=0) - math.log(logits.shape[0])
    return F.nll_loss(log_mix, target, ignore_index=ignore_index, reduction=reduction)
