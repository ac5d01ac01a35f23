"""Eager PyTorch α-BN, written the way a user would: ``torch.var_mean`` of the batch, mix with the
running statistics, normalise by hand (``F.batch_norm`` refuses a gradient through its running
statistics, and the mixed statistics carry one), and the BatchNorm update of the running statistics."""

from __future__ import annotations

import torch


def alpha_batchnorm(x, running_mean, running_var, weight=None, bias=None, *, source_weight,
                    training=True, momentum=0.1, eps=1e-5):
    dims = [0] + list(range(2, x.ndim))
    var_t, mu_t = torch.var_mean(x, dim=dims, correction=0)
    a = source_weight
    mu_hat = a * running_mean.to(mu_t.dtype) + (1 - a) * mu_t
    var_hat = a * running_var.to(var_t.dtype) + (1 - a) * var_t
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mu_hat.view(shape)) * torch.rsqrt(var_hat + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if not training:
        return y, running_mean.clone(), running_var.clone()
    with torch.no_grad():
        m = x.numel() // max(1, x.shape[1])
        new_mean = (1 - momentum) * running_mean + momentum * mu_t.detach().to(running_mean.dtype)
        new_var = (1 - momentum) * running_var + momentum * (var_t.detach() * m / max(1, m - 1)).to(running_var.dtype)
    return y, new_mean, new_var
