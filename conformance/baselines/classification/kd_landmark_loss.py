"""Eager KD-Loss for facial landmarks (P14), written the way a user would (the authors' TensorFlow
``kd_loss`` transcribed to PyTorch ops)."""

from __future__ import annotations

import torch


def kd_landmark_loss(pred, target, tough, tolerant, *, alpha_tough=1.9, alpha_tough_neg=-0.45,
                     alpha_tolerant=1.8, alpha_tolerant_neg=-0.4, main_weight=2.0, tough_weight=1.0,
                     tolerant_weight=1.0, reflection=0.15, reduction="mean"):
    p, g = pred, target
    side = torch.sign(p - g)
    t_u = g + side * torch.abs(tough - g)
    b_u = g + reflection * side * torch.abs(tough - g)
    t_o = g + side * torch.abs(tolerant - g)
    b_o = g + reflection * side * torch.abs(tolerant - g)
    map_u = (alpha_tough * (torch.sign(p - t_u) * torch.sign(t_u - g) > 0)
             + alpha_tough_neg * (torch.sign(t_u - p) * torch.sign(p - b_u) >= 0))
    map_o = (alpha_tolerant * (torch.sign(p - t_o) * torch.sign(t_o - g) > 0)
             + alpha_tolerant_neg * (torch.sign(t_o - p) * torch.sign(p - b_o) >= 0))
    e, d = torch.abs(g - p), torch.abs(g - tolerant)
    main = torch.where(e <= d, 3 * e, e * e + 3 * d - d * d)
    loss = (main_weight * main + tough_weight * map_u.detach() * torch.abs(t_u.detach() - p)
            + tolerant_weight * map_o.detach() * torch.abs(t_o.detach() - p))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
