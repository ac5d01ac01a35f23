"""Eager LDR-KL and ALDR-KL (P42), written the way a user would."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._rows import reduce_rows, rows


def ldr_kl_loss(logits, target, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
    active, safe, w = rows(target, ignore_index, None, logits[:, 0])
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))  # ignored rows: gradient exactly 0
    onehot = F.one_hot(safe, logits.shape[1]).to(logits.dtype)
    f_y = logits.gather(1, safe[:, None])
    d = logits - f_y + margin * (1 - onehot)
    loss = lam * (torch.logsumexp(d / lam, dim=-1) - math.log(logits.shape[1]))
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction)


def aldr_kl_loss(logits, target, lam_prev, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100,
                 reduction="mean"):
    k = logits.shape[1]
    log_k = math.log(k)
    active, safe, w = rows(target, ignore_index, None, logits[:, 0])
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))  # ignored rows: gradient exactly 0
    with torch.no_grad():  # the temperature update is detached and kept in float32, like the state it feeds
        lam_prev = lam_prev.float()
        p = torch.softmax(logits.float() / lam_prev[:, None], dim=-1) + 1e-5
        p = p / p.sum(dim=-1, keepdim=True)
        kl = (p * torch.log(k * p)).sum(dim=-1)
        lam = lam0 * (1 - kl / (alpha * log_k)) if k > 1 else torch.full_like(kl, lam0)
        lam = torch.where(active, lam, lam_prev)
    onehot = F.one_hot(safe, k).to(logits.dtype)
    d = logits - logits.gather(1, safe[:, None]) + margin * (1 - onehot)
    loss = lam * (torch.logsumexp(d / lam[:, None], dim=-1) - log_k)
    loss = loss - alpha * log_k / (2 * lam0) * (lam - lam0) ** 2
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction), lam
