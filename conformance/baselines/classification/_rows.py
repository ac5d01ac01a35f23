"""What the eager row-wise losses share: per-row label masks and class weights, and the reduction."""

from __future__ import annotations

import torch


def rows(target, ignore_index, weight, like):
    active = target != ignore_index
    safe = torch.where(active, target, 0).long()
    w = weight[safe].to(like.dtype) if weight is not None else torch.ones_like(like)
    return active, safe, torch.where(active, w, torch.zeros_like(w))


def reduce_rows(loss, w, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()
