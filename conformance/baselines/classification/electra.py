"""Eager ELECTRA generator loss + sampler and RTD loss (P35), written the way a user would: the
generator materialises the (M, V) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def electra_generator_sample(hidden, weight, target, slot_weight, noise, bias=None, *, temperature=1.0,
                             disallow_correct=False, reduction="mean"):
    logits = F.linear(hidden, weight, bias)  # (M, V): the tensor the fused kernel never stores
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    w = slot_weight.float()
    terms = torch.where(w != 0, w * ce, torch.zeros_like(ce))
    if reduction == "none":
        loss = terms
    elif reduction == "sum":
        loss = terms.sum()
    else:
        loss = terms.sum() / (w.sum() + 1e-6)
    with torch.no_grad():
        scores = logits.float() / temperature - torch.log(-torch.log(noise.float() + 1e-9) + 1e-9)
        if disallow_correct:
            scores = scores - 1000.0 * F.one_hot(target.long(), weight.shape[0])
        samples = scores.argmax(dim=-1)
    return loss.to(hidden.dtype), samples


def rtd_loss(logits, labels, attention_mask, *, reduction="mean"):
    a = attention_mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    terms = torch.where(a != 0, a * bce, torch.zeros_like(bce))
    if reduction == "none":
        out = terms
    elif reduction == "sum":
        out = terms.sum()
    else:
        out = terms.sum() / (a.sum() + 1e-6)
    return out.to(logits.dtype)
