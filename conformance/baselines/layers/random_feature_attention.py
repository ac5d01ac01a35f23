"""Eager PyTorch random-feature attention, written the way a user would: the (B, M, N) score
tensor by einsum, the activation, then two more einsums."""

from __future__ import annotations

import torch


def random_feature_attention(query, keys, weights, values, *, activation="relu"):
    s = torch.einsum("bc,mce,bne->bmn", query, weights, keys)
    a = torch.relu(s) if activation == "relu" else torch.exp(s)
    phi = torch.einsum("bmn,bne->bme", a, keys) / keys.shape[1]
    return torch.einsum("bme,med->bd", phi, values)
