"""Eager PyTorch dual LoRA linear, written the way a user would (the authors' ``LoRALinearTwo.forward``
with the dropout masks given)."""

from __future__ import annotations

import torch.nn.functional as F


def dual_lora_linear(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias=None,
                     dropout_mask1=None, dropout_mask2=None, *, scale=1.0):
    out = F.linear(x, weight, bias)
    lora_1 = F.linear(F.linear(x, lora_a1), lora_b1)
    lora_2 = F.linear(F.linear(x, lora_a2), lora_b2)
    if dropout_mask1 is not None:
        lora_1 = lora_1 * dropout_mask1
    if dropout_mask2 is not None:
        lora_2 = lora_2 * dropout_mask2
    a = alpha.to(out.dtype)[:, None]
    return out + scale * (1 - a) * lora_1 + scale * a * lora_2
