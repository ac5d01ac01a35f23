"""Eager PyTorch attentive statistics pooling, written the way the authors' layer computes it
(softmax over T, weighted E[x] and E[x^2], ``clamp(min=eps)`` on the variance, concatenation)."""

from __future__ import annotations

import torch


def attentive_stats_pool(x, logits, *, eps=1e-9):
    alpha = torch.softmax(logits, dim=2)
    mean = torch.sum(alpha * x, dim=2)
    residuals = torch.sum(alpha * x**2, dim=2) - mean**2
    std = torch.sqrt(residuals.clamp(min=eps))
    return torch.cat([mean, std], dim=1)
