"""Eager-PyTorch Proto-Triplet and ICNN losses, written the way a user would (the authors' way):
the (N, W, D) / (n, M, D) difference tensors are materialised, neighbours come from a sort."""

from __future__ import annotations

import torch


def _distances(a, b):
    return torch.sqrt(((a.unsqueeze(1) - b.unsqueeze(0)) ** 2).sum(dim=2) + 1e-6)


def proto_triplet_loss(queries, query_labels, prototypes, *, margin=0.5, reduction="mean"):
    dist = _distances(queries, prototypes)
    own = torch.nn.functional.one_hot(query_labels.long(), prototypes.shape[0]).bool()
    d_pos = dist[own]
    d_neg = torch.where(own, torch.full_like(dist, float("inf")), dist).min(dim=1).values
    loss = torch.clamp(d_pos - d_neg + margin, min=0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def icnn_loss(origin, origin_labels, target=None, target_labels=None, *, k=4, ipc=None):
    eps = 1e-7
    if target is None:
        target, target_labels = origin, origin_labels
    m = target.shape[0]
    clamped = k + 2 >= m
    k = m - 2 if clamped else k
    ipc = k + 1 if ipc is None else ipc
    dist_all = _distances(origin, target)
    order = torch.sort(dist_all, dim=1, stable=True).indices[:, 1:ipc + 1]
    dist = torch.gather(dist_all, 1, order)
    same = target_labels[order] == origin_labels[:, None]
    other = ~same
    nn_dc = torch.where(other, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    nd = dist[:, :k] / (nn_dc[:, None] + eps)
    nd = nd / torch.clamp(nd.max(dim=1, keepdim=True).values, min=1.0)
    same_k, other_k = same[:, :k].to(dist.dtype), other[:, :k].to(dist.dtype)
    cnt, dcnt = same_k.sum(dim=1), other_k.sum(dim=1)
    lam_sc = 1 - ((nd * same_k).sum(dim=1) / (cnt + eps)).sum() / (torch.count_nonzero(cnt) + eps)
    dd = dist[:, :k] * other_k
    dd = dd / (dd.max() + eps)
    lam = (dd.sum(dim=1) / (dcnt + eps)).sum() / (torch.count_nonzero(dcnt) + eps)
    lam_dc = torch.abs(lam - 1.0) if not bool(other_k.any()) else torch.abs(lam)
    gamma = 1.0 if clamped else (cnt / k).sum() / origin.shape[0]
    score = ((lam_sc + lam_dc) / 2 + gamma) / 2
    return -torch.log(score)
