"""Eager smooth adversarial comp-sum loss (P13), written the way a user would."""

from __future__ import annotations

import torch

from ._rows import reduce_rows, rows


def smooth_adv_comp_sum_loss(logits, target, adv_logits, *, tau=1.0, nu=1.0, ignore_index=-100, reduction="mean"):
    log_p = torch.log_softmax(logits, dim=-1)
    active, safe, w = rows(target, ignore_index, None, log_p[:, 0])
    log_py = log_p.gather(1, safe[:, None])[:, 0]
    loss = -log_py if tau == 1.0 else -torch.expm1((tau - 1.0) * log_py) / (tau - 1.0)
    e = adv_logits - logits
    margin_shift = e - e.gather(1, safe[:, None])
    loss = loss + nu * torch.linalg.vector_norm(margin_shift, dim=1)
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction)
