"""Eager PyTorch SNNK linear layer, written the way a user would (the authors' `NNK_Relu` /
`input_to_rfs_torch_vectorized` in a few lines): features, then a matmul."""

from __future__ import annotations

import math

import torch


def snnk_linear(x, projection, weight, bias=None, rate=None, amplitude=None, *, feature="relu", floor=0.0):
    m = projection.shape[0]
    s = x @ projection.T
    if feature == "relu":
        phi = torch.clamp(s, min=floor) / math.sqrt(m)
    else:
        a = torch.ones_like(projection[:, 0]) if rate is None else rate.to(x.dtype)
        amp = torch.ones_like(projection[:, 0]) if amplitude is None else amplitude.to(x.dtype)
        sq = (x * x).sum(dim=-1, keepdim=True)
        phi = amp / math.sqrt(m) * torch.exp(a * s - a * a * sq / 2)
    y = phi @ weight.T
    return y + bias if bias is not None else y
