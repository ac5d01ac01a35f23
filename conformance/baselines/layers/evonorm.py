"""EvoNorm-S0 / EvoNorm-B0 (P51) in eager PyTorch, written as timm's ``EvoNorm2dS0`` /
``EvoNorm2dB0`` compute them (group / instance / batch variances with ``torch.var``, sigmoid,
division, maximum, affine), with the TensorFlow defaults and the biased running-variance update."""

from __future__ import annotations

import torch


def _c(p):
    return p.view(1, -1, 1, 1)


def evonorm_s0(x, v, weight, bias, *, groups=32, eps=1e-5):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, -1)
    std = (xg.float().var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt().to(x.dtype)
    num = x * torch.sigmoid(_c(v) * x)
    y = (num.reshape(n, groups, -1) / std).reshape(x.shape)
    return y * _c(weight) + _c(bias)


def evonorm_b0(x, v, weight, bias, running_var, *, training=True, momentum=0.1, eps=1e-5):
    inst_std = (x.float().var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt().to(x.dtype)
    new_rv = running_var
    if training:
        var = x.float().var(dim=(0, 2, 3), unbiased=False)
        if running_var is not None:
            new_rv = (running_var * (1 - momentum) + var.detach() * momentum).to(running_var.dtype)
    else:
        var = running_var.float()
    left = (_c(var) + eps).sqrt().to(x.dtype)
    den = torch.maximum(left, _c(v) * x + inst_std)
    return x / den * _c(weight) + _c(bias), new_rv
