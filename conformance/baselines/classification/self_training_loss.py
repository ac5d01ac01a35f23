"""Eager self-training objective (P28), written the way a user would: cross-entropy on the labelled
rows, and cross-entropy of the unlabelled rows against their detached argmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def self_training_loss(logits, target, logits_unlabeled, *, lam=1.0, ignore_index=-100, reduction="mean"):
    labelled = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    pseudo_labels = logits_unlabeled.detach().argmax(dim=-1)
    pseudo = lam * F.cross_entropy(logits_unlabeled, pseudo_labels, reduction="none")
    if reduction == "none":
        return torch.cat([labelled, pseudo])
    if reduction == "sum":
        return labelled.sum() + pseudo.sum()
    active = (target != ignore_index).sum().clamp_min(1)
    return labelled.sum() / active + pseudo.sum() / max(pseudo.shape[0], 1)
