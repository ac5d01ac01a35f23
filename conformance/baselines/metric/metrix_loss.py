"""Eager-PyTorch Metrix loss (P22), written the way a user would: ``torch.cdist`` over the whole batch
for the clean pairs (a B x B matrix, as pytorch-metric-learning's ``LpDistance``), and the mixed part
in the direct per-triple form (gather the three rows of every triple, an (M, D) tensor each). The
authors' code instead computes the full M x M distance matrix between anchors and mixed vectors and
keeps its diagonal, which does not fit in memory at benchmark sizes (M ~ 10^5 - 10^6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _avg_nonzero(losses):
    return losses.sum() / (losses != 0).sum().clamp(min=1)


def metrix_loss(embeddings, labels, anchors, mix_a, mix_b, *, lam, mix_weight=0.4, pos_margin=0.0,
                neg_margin=0.5):
    x = F.normalize(embeddings, dim=1)
    # torch.cdist has no 16-bit kernels (pytorch-metric-learning loops over pairs there): upcast.
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dist = torch.cdist(xf, xf).to(x.dtype)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    zero = torch.zeros_like(dist)
    pos_loss = torch.where(pos, F.relu(dist - pos_margin), zero)
    neg_loss = torch.where(~same, F.relu(neg_margin - dist), zero)
    clean = _avg_nonzero(pos_loss) + _avg_nonzero(neg_loss)
    mixed = F.normalize(lam * embeddings[mix_a] + (1 - lam) * embeddings[mix_b], dim=1)
    d_mix = (x[anchors] - mixed).norm(dim=1)
    mix = _avg_nonzero(lam * F.relu(d_mix - pos_margin)) + _avg_nonzero((1 - lam) * F.relu(neg_margin - d_mix))
    return clean + mix_weight * mix
