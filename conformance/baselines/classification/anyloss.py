"""Eager AnyLoss (P6), written the way a user would (the authors' Keras code ported to PyTorch,
with the batch's own N): about a dozen elementwise and reduction launches, each reading or writing N."""

from __future__ import annotations

import torch


def _anyloss(probs, target, *, metric, beta, amplifier, smoothing, reduction, batch=None):
    """``batch`` replaces N as the authors' code does with its global constant (a bug on a short
    last batch, kept here so the conformance suite can show it catches it)."""
    y = target.to(probs.dtype)
    a = torch.sigmoid(amplifier * (probs - 0.5))
    n = probs.shape[0] if batch is None else batch
    y1 = y.sum(0)
    y0 = n - y1
    s = a.sum(0)
    tp = (y * a).sum(0)
    fp = s - tp
    tn = n - y1 - s + tp
    if metric == "f_beta":
        m = (1 + beta**2) * tp / (beta**2 * y1 + tp + fp + smoothing)
    elif metric == "g_mean":
        m = tp * tn / (y1 * y0 + smoothing)
    elif metric == "balanced_accuracy":
        m = (y0 * tp + y1 * tn) / (2 * y1 * y0 + smoothing)
    else:
        m = (tp + tn) / n
    loss = 1 - m
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def anyloss(probs, target, *, metric="f_beta", beta=1.0, amplifier=73.0, smoothing=1e-5, reduction="mean"):
    return _anyloss(probs, target, metric=metric, beta=beta, amplifier=amplifier, smoothing=smoothing,
                    reduction=reduction)
