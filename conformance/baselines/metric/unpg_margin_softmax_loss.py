"""Eager PyTorch UNPG loss, written the way a user would (after the authors' ``HeadAndLoss`` /
``box_and_whisker_algorithm`` / ``UNPG`` head): the (B, C) logits and the (B, B) pair cosines are
materialised, the negative pairs sorted, and the kept ones appended as extra columns of every row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLAMP = 2.0**-20


def _unpg(embeddings, labels, weight, *, margin_type="arcface", scale=64.0, margin=0.5, whisker=1.5, eps=1e-12,
          reduction="mean", pairs="filtered"):
    """``pairs``: "filtered" (UNPG), "none" (plain ArcFace / CosFace), "all" (no whisker filter),
    "any label" (positive pairs counted as negatives) — the last three for deliberately wrong ports."""
    x = F.normalize(embeddings, dim=1, eps=eps)
    w = F.normalize(weight, dim=1, eps=eps)
    labels = labels.long()
    cos = x @ w.t()
    target = cos.gather(1, labels[:, None])
    if margin_type == "arcface":
        t = torch.cos(torch.acos(target.clamp(-1 + CLAMP, 1 - CLAMP)) + margin)
    else:
        t = target - margin
    is_target = F.one_hot(labels, weight.shape[0]).bool()
    logits = scale * torch.where(is_target, t, cos)
    if pairs != "none":
        b = x.shape[0]
        upper = torch.ones(b, b, dtype=torch.bool, device=x.device).triu(1)
        negative = upper if pairs == "any label" else upper & (labels[:, None] != labels[None, :])
        sn = (x @ x.t())[negative]
        if sn.numel() > 0 and pairs != "all":
            ordered = torch.sort(sn).values
            n = ordered.numel()
            q1, q3 = ordered[n // 4], ordered[(3 * n) // 4]
            iqr = q3 - q1
            sn = sn[(sn >= q1 - whisker * iqr) & (sn <= q3 + whisker * iqr)]
        logits = torch.cat([logits, scale * sn[None, :].expand(b, -1)], dim=1)
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction=reduction)
    return loss.to(embeddings.dtype)


def unpg_margin_softmax_loss(embeddings, labels, weight, *, margin_type="arcface", scale=64.0, margin=0.5,
                             whisker=1.5, eps=1e-12, reduction="mean"):
    return _unpg(embeddings, labels, weight, margin_type=margin_type, scale=scale, margin=margin, whisker=whisker,
                 eps=eps, reduction=reduction)
