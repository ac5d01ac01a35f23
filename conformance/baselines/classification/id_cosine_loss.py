"""Eager identity loss (P4): one minus PyTorch's cosine similarity, as a user writes it."""

from __future__ import annotations

import torch.nn.functional as F


def id_cosine_loss(pred, source, *, eps=1e-8, reduction="mean"):
    loss = 1 - F.cosine_similarity(pred, source, dim=1, eps=eps)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
