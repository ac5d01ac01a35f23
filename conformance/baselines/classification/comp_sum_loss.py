"""Eager comp-sum losses (P13), written the way a user would."""

from __future__ import annotations

import torch

from ._rows import reduce_rows, rows


def comp_sum_loss(logits, target, *, tau=1.0, weight=None, ignore_index=-100, reduction="mean"):
    log_p = torch.log_softmax(logits, dim=-1)
    active, safe, w = rows(target, ignore_index, weight, log_p[:, 0])
    log_py = log_p.gather(1, safe[:, None])[:, 0]
    loss = -log_py if tau == 1.0 else -torch.expm1((tau - 1.0) * log_py) / (tau - 1.0)
    loss = torch.where(active, w * loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction)
