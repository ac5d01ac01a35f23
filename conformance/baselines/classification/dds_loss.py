"""Eager DDS surrogate loss (P3), as in the DDS authors' notebook: the direction under no_grad, then
``(z_tgt * grad).sum() / (h * w)``."""

from __future__ import annotations

import torch


def dds_loss(z_tgt, eps_src_uncond, eps_src_cond, eps_tgt_uncond, eps_tgt_cond, *, guidance_scale=7.5,
             mask=None, weight=None, reduction="sum"):
    with torch.no_grad():
        src = eps_src_uncond + guidance_scale * (eps_src_cond - eps_src_uncond)
        tgt = eps_tgt_uncond + guidance_scale * (eps_tgt_cond - eps_tgt_uncond)
        grad = tgt - src
        if weight is not None:
            grad = weight[:, None, None, None] * grad
        if mask is not None:
            grad = mask * grad
    h, w = z_tgt.shape[2:]
    per_sample = (z_tgt * grad).sum(dim=(1, 2, 3)) / (h * w)
    if reduction == "none":
        return per_sample
    return per_sample.sum() / (z_tgt.shape[0] if reduction == "mean" else 1)
