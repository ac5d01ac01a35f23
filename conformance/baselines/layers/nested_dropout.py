"""Eager PyTorch nested dropout, written the way a user would (the authors' mask construction, with
one cut-off per row)."""

from __future__ import annotations

import torch


def nested_dropout(x, k, *, training=True):
    if not training:
        return x.clone()
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < k[:, None]
    return x * mask.to(x.dtype)
