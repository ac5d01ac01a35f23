"""Eager ramp loss (P28), written the way a user would."""

from __future__ import annotations

import torch


def ramp_loss(scores, target, *, kappa=1.0, reduction="mean"):
    y = torch.where(target == 1, 1.0, -1.0).to(scores.dtype)
    loss = torch.clamp(1.0 - kappa * y * scores, min=0.0, max=1.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
