"""Eager PyTorch masked mean pooling, written the way a user would (sentence-transformers'
``Pooling(pooling_mode="mean")``, then ``F.normalize``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_pool(hidden, mask, *, normalize=False, eps=1e-12):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(dim=1)
    count = torch.clamp(m.sum(dim=1), min=1e-9)
    out = summed / count
    return F.normalize(out, p=2, dim=1, eps=eps) if normalize else out
