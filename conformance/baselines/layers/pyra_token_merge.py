"""Eager PyTorch PYRA token merging, written the way the authors' code does it (ToMe's
``bipartite_soft_matching`` + PYRA's modulation + ``merge_wavg``), with the library's argument names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pyra_token_merge(x, size, metric, a, b, ln_weight, ln_bias, *, r, class_token=False, distill_token=False,
                     eps=1e-5):
    if r <= 0:  # ToMe's do_nothing; the parameters join the graph (with weight 0) so autograd sees them
        unused = sum(p.sum() for p in (a, b, ln_weight, ln_bias))
        return x + 0 * unused.to(x.dtype), size.clone()
    n, t, c = x.shape
    with torch.no_grad():
        k = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ka, kb = k[..., ::2, :], k[..., 1::2, :]
        scores = ka @ kb.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    xs = x * size[..., None]
    src, dst = xs[..., ::2, :], xs[..., 1::2, :]
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t - (t // 2) - r, c))
    s = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    d = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
    y = F.layer_norm(s + d, (c,), ln_weight, ln_bias, eps)
    w1 = 2 * torch.sigmoid((a[None, :, None] * y).sum(dim=1, keepdim=True))  # (n, 1, c)
    w2 = 2 * torch.sigmoid(y @ b[:, None]) - 1  # (n, r, 1)
    s = s * (1 + w1 * w2)
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), s, reduce="sum")

    sz = size[..., None]
    sz_src, sz_dst = sz[..., ::2, :], sz[..., 1::2, :]
    sz_unm = sz_src.gather(dim=-2, index=unm_idx)
    sz_dst = sz_dst.scatter_reduce(-2, dst_idx, sz_src.gather(dim=-2, index=src_idx), reduce="sum")
    if distill_token:
        out = torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        new = torch.cat([sz_unm[:, :1], sz_dst[:, :1], sz_unm[:, 1:], sz_dst[:, 1:]], dim=1)
    else:
        out = torch.cat([unm, dst], dim=1)
        new = torch.cat([sz_unm, sz_dst], dim=1)
    return out / new, new[..., 0]
