"""Eager-PyTorch HPM relative loss and easy-to-hard mask, written the way a user would: the
relative loss broadcasts three (B, M, M) tensors (pair differences, positive and negative labels),
the mask sorts every row."""

from __future__ import annotations

import torch


def hpm_relative_loss(pred, target, *, eps=1e-6, reduction="mean"):
    positive = target.unsqueeze(1) > target.unsqueeze(2)
    negative = target.unsqueeze(1) < target.unsqueeze(2)
    z = pred.unsqueeze(1) - pred.unsqueeze(2)  # z[b, i, j] = p_j - p_i
    if eps == 0.0:
        pair = torch.where(positive, -torch.nn.functional.logsigmoid(z), -torch.nn.functional.logsigmoid(-z))
    else:
        pair = torch.where(positive, -torch.log(torch.sigmoid(z) + eps), -torch.log(torch.sigmoid(-z) + eps))
    valid = positive | negative
    pair = torch.where(valid, pair, torch.zeros_like(pair))
    if reduction == "none":
        return pair.sum(dim=(1, 2))
    if reduction == "sum":
        return pair.sum()
    count = valid.sum()
    return pair.sum() / count.clamp(min=1)


def easy_to_hard_mask(pred, noise, *, epoch, total_epochs, mask_ratio=0.75):
    b, length = pred.shape
    n_keep = int(length * (1 - mask_ratio))
    n_hard = max(int((length - n_keep) * (float((epoch + 1) / total_epochs) * 0.5)), 0)
    # Hardest first: pred descending, lower index first among equals (stable sort), NaN hardest.
    hard_key = torch.nan_to_num(pred.float(), nan=float("inf"))
    hard_order = torch.sort(hard_key, dim=1, descending=True, stable=True).indices
    hard_order = torch.gather(hard_order, 1, torch.sort(torch.isnan(torch.gather(pred, 1, hard_order)).to(torch.int8),
                                                        dim=1, descending=True, stable=True).indices)
    hard = torch.zeros(b, length, dtype=torch.bool, device=pred.device)
    hard.scatter_(1, hard_order[:, :n_hard], True)
    # Kept: the n_keep non-hard patches with the smallest noise (index order among equals, NaN last).
    key = torch.where(hard, torch.full_like(noise, float("inf")), noise)
    rank_key = torch.nan_to_num(key.float(), nan=float("inf"))
    order = torch.sort(rank_key, dim=1, stable=True).indices
    # Among keys mapped to +inf, real +inf noise comes before NaN noise, and hard patches come last.
    tier = (torch.isnan(noise) & ~hard).to(torch.int8) + 2 * hard.to(torch.int8)
    order = torch.gather(order, 1, torch.sort(torch.gather(tier, 1, order), dim=1, stable=True).indices)
    mask = torch.ones(b, length, dtype=torch.bool, device=pred.device)
    mask.scatter_(1, order[:, :n_keep], False)
    return mask
