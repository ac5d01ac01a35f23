"""Eager-PyTorch Mann–Whitney loss and AUC (P46), written the way a user would: the (Q, P, N) tensor
of positive-minus-negative margins is materialised."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masks(pos, neg, pos_mask, neg_mask):
    pm = torch.ones_like(pos, dtype=torch.bool) if pos_mask is None else pos_mask
    nm = torch.ones_like(neg, dtype=torch.bool) if neg_mask is None else neg_mask
    return pm, nm


def mann_whitney_loss(pos, neg, pos_mask=None, neg_mask=None, *, tau=0.01, normalization="pairs",
                      reduction="mean"):
    pm, nm = _masks(pos, neg, pos_mask, neg_mask)
    pos = torch.where(pm, pos, torch.zeros_like(pos))  # masked NaN would reach the gradient otherwise
    neg = torch.where(nm, neg, torch.zeros_like(neg))
    valid = pm[:, :, None] & nm[:, None, :]
    pairs = F.softplus(-(pos[:, :, None] - neg[:, None, :]) / tau)
    sums = torch.where(valid, pairs, torch.zeros_like(pairs)).sum(dim=(1, 2))
    n_pos, n_neg = pm.sum(1).to(sums.dtype), nm.sum(1).to(sums.dtype)
    has_pairs = (n_pos > 0) & (n_neg > 0)
    denom = n_pos * n_neg if normalization == "pairs" else n_pos
    per_query = torch.where(has_pairs, sums / denom.clamp(min=1), torch.zeros_like(sums))
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    return per_query.sum() / has_pairs.sum()


def mann_whitney_auc(pos, neg, pos_mask=None, neg_mask=None, *, reduction="mean"):
    pm, nm = _masks(pos, neg, pos_mask, neg_mask)
    valid = pm[:, :, None] & nm[:, None, :]
    a, b = pos[:, :, None], neg[:, None, :]
    wins = ((a > b) & valid).sum(dim=(1, 2), dtype=torch.float64) + 0.5 * ((a == b) & valid).sum(
        dim=(1, 2), dtype=torch.float64)
    n_pairs = valid.sum(dim=(1, 2), dtype=torch.float64)
    has_nan = (pos.isnan() & pm).any(1) | (neg.isnan() & nm).any(1)
    auc = torch.where(has_nan, float("nan"), wins / n_pairs)
    if reduction == "none":
        return auc.float()
    has_pairs = n_pairs > 0
    return (torch.where(has_pairs, auc, 0.0).sum() / has_pairs.sum()).float()
