"""Eager spherical Z-loss (P5), written the way a user would."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._rows import reduce_rows, rows


def spherical_z_loss(logits, target, *, a=1.0, b=0.0, eps=1e-6, ignore_index=-100, reduction="mean"):
    active, safe, w = rows(target, ignore_index, None, logits[:, 0])
    # Zero the ignored rows first: a NaN there would otherwise reach the gradient through mean/std.
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))
    mu = logits.mean(dim=-1, keepdim=True)
    sigma = logits.std(dim=-1, unbiased=False, keepdim=True)
    z = (logits - mu) / (sigma + eps)
    z_y = z.gather(1, safe[:, None])[:, 0]
    loss = F.softplus(a * (b - z_y)) / a
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction)
