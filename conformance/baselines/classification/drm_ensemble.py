"""Eager DRM ensemble (P32), written the way the authors' adaptation code does it: softmax and
entropy per head, weights 1 / H^gamma normalised over the heads, a loop over the domain heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def drm_ensemble(logits, *, gamma=1.0, include_shared_head_in_sum=False):
    heads = logits.shape[0]
    y_hats = torch.softmax(logits, dim=-1)
    entropy = (-(y_hats * torch.log_softmax(logits, dim=-1)).sum(-1)).clamp_min(1e-12)  # (D+1, B)
    if gamma < 0:
        idx = entropy.argmin(dim=0)
        return y_hats.gather(0, idx[None, :, None].expand(1, *logits.shape[1:]))[0]
    weight = F.normalize(1.0 / entropy**gamma, p=1, dim=0)
    com_result = torch.zeros_like(y_hats[0])
    for i in range(heads if include_shared_head_in_sum else heads - 1):
        com_result = com_result + weight[i][:, None] * y_hats[i]
    return com_result
