"""Eager gradient-matching distance (P17), written the way the dataset-condensation repositories
write it (DC's ``distance_wb`` / ``match_loss``): a Python loop over the parameter gradients."""

from __future__ import annotations

import math

import torch

from twinops.reference.classification.gradient_match_distance import split_named


def _distance_wb(gwr, gws, eps):
    if gwr.ndim == 1:  # biases and norm parameters are skipped (a zero that keeps gws in the graph)
        return torch.where(torch.zeros_like(gws, dtype=torch.bool), gws, 0.0).sum()
    gwr = gwr.reshape(gwr.shape[0], math.prod(gwr.shape[1:]))
    gws = gws.reshape(gws.shape[0], math.prod(gws.shape[1:]))
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + eps))


def gradient_match_distance(grads_syn, grads_real, *, metric="ours", eps=1e-6):
    if metric == "ours":
        dis = torch.zeros((), dtype=grads_syn[0].dtype, device=grads_syn[0].device)
        for gws, gwr in zip(grads_syn, grads_real):
            dis = dis + _distance_wb(gwr, gws, eps)
        return dis
    gw_real_vec = torch.cat([g.reshape(-1) for g in grads_real])
    gw_syn_vec = torch.cat([g.reshape(-1) for g in grads_syn])
    if metric == "mse":
        return torch.sum((gw_syn_vec - gw_real_vec) ** 2)
    return 1 - torch.sum(gw_real_vec * gw_syn_vec) / (torch.norm(gw_real_vec) * torch.norm(gw_syn_vec) + eps)


def gradient_match_distance_named(*, metric="ours", eps=1e-6, **tensors):
    syn, real = split_named(tensors)
    return gradient_match_distance(syn, real, metric=metric, eps=eps)
