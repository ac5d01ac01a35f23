"""Eager PyTorch multi-level operators (P34), written the way a user would: ``index_add_`` along
each axis with the group sizes from ``bincount`` for coalescing, fancy indexing for de-coalescing,
``torch.lerp`` for interpolation."""

from __future__ import annotations

import torch


def _pairs(size, width, device):
    return torch.arange(size, device=device) % width


def coalesce(weight, out_groups=None, in_groups=None, *, out_width=None, in_width=None):
    t_out = out_width or weight.shape[0] // 2
    g_out = _pairs(weight.shape[0], t_out, weight.device) if out_groups is None else out_groups.long()
    w = weight.float()
    rows = torch.zeros((t_out,) + w.shape[1:], device=w.device).index_add_(0, g_out, w)
    rows = rows / torch.bincount(g_out, minlength=t_out).to(w.dtype).reshape((t_out,) + (1,) * (w.ndim - 1))
    if weight.ndim == 1:
        return rows.to(weight.dtype)
    t_in = in_width or weight.shape[1] // 2
    g_in = _pairs(weight.shape[1], t_in, weight.device) if in_groups is None else in_groups.long()
    return torch.zeros(t_out, t_in, device=w.device).index_add_(1, g_in, rows).to(weight.dtype)


def decoalesce(weight, out_groups=None, in_groups=None):
    t_out = weight.shape[0]
    g_out = _pairs(2 * t_out, t_out, weight.device) if out_groups is None else out_groups.long()
    grown = weight[g_out]
    if weight.ndim == 1:
        return grown
    t_in = weight.shape[1]
    g_in = _pairs(2 * t_in, t_in, weight.device) if in_groups is None else in_groups.long()
    sizes = torch.bincount(g_in, minlength=t_in).to(weight.dtype)
    return grown[:, g_in] / sizes[g_in]


def interpolate_params(original, decoalesced, *, alpha=0.5):
    return torch.lerp(original, decoalesced, alpha)
