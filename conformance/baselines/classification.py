"""Eager-PyTorch versions of the classification losses, written the way a user would."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rows(target, ignore_index, weight, like):
    active = target != ignore_index
    safe = torch.where(active, target, 0).long()
    w = weight[safe].to(like.dtype) if weight is not None else torch.ones_like(like)
    return active, safe, torch.where(active, w, torch.zeros_like(w))


def _reduce(loss, w, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


def comp_sum_loss(logits, target, *, tau=1.0, weight=None, ignore_index=-100, reduction="mean"):
    log_p = torch.log_softmax(logits, dim=-1)
    active, safe, w = _rows(target, ignore_index, weight, log_p[:, 0])
    log_py = log_p.gather(1, safe[:, None])[:, 0]
    loss = -log_py if tau == 1.0 else -torch.expm1((tau - 1.0) * log_py) / (tau - 1.0)
    loss = torch.where(active, w * loss, torch.zeros_like(loss))
    return _reduce(loss, w, reduction)


def spherical_z_loss(logits, target, *, a=1.0, b=0.0, eps=1e-6, ignore_index=-100, reduction="mean"):
    active, safe, w = _rows(target, ignore_index, None, logits[:, 0])
    # Zero the ignored rows first: a NaN there would otherwise reach the gradient through mean/std.
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))
    mu = logits.mean(dim=-1, keepdim=True)
    sigma = logits.std(dim=-1, unbiased=False, keepdim=True)
    z = (logits - mu) / (sigma + eps)
    z_y = z.gather(1, safe[:, None])[:, 0]
    loss = F.softplus(a * (b - z_y)) / a
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return _reduce(loss, w, reduction)


def ldr_kl_loss(logits, target, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
    active, safe, w = _rows(target, ignore_index, None, logits[:, 0])
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))  # ignored rows: gradient exactly 0
    onehot = F.one_hot(safe, logits.shape[1]).to(logits.dtype)
    f_y = logits.gather(1, safe[:, None])
    d = logits - f_y + margin * (1 - onehot)
    loss = lam * (torch.logsumexp(d / lam, dim=-1) - math.log(logits.shape[1]))
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return _reduce(loss, w, reduction)


def aldr_kl_loss(logits, target, lam_prev, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100,
                 reduction="mean"):
    k = logits.shape[1]
    log_k = math.log(k)
    active, safe, w = _rows(target, ignore_index, None, logits[:, 0])
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
    return _reduce(loss, w, reduction), lam
