"""Eager MSE distillation losses (P45 logit MSE, P60 softmax MSE with ground truth), written the way a user would."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._rows import reduce_rows, rows


def logit_mse_distillation(student_logits, teacher_logits, *, reduction="mean"):
    loss = F.mse_loss(student_logits, teacher_logits.detach(), reduction="none").mean(dim=1)
    return reduce_rows(loss, torch.ones_like(loss), reduction)


def softmax_mse_distillation(logits, target, teacher_logits, *, alpha=0.6, ignore_index=-100, reduction="mean"):
    p = torch.softmax(logits, dim=-1)
    q = torch.softmax(teacher_logits.detach(), dim=-1)
    active, safe, w = rows(target, ignore_index, None, p[:, 0])
    onehot = F.one_hot(safe, logits.shape[1]).to(p.dtype)
    loss = alpha * ((p - onehot) ** 2).mean(dim=1) + (1.0 - alpha) * ((p - q) ** 2).mean(dim=1)
    loss = torch.where(active, loss, torch.zeros_like(loss))
    return reduce_rows(loss, w, reduction)
