"""Eager PyTorch versions of the Hyp-OC (P48) operations, written the way hyptorch (the authors'
dependency) writes them: norms, clamps, tanh, artanh with a clamped argument for distances.

The MLR logits are the exception. hyptorch broadcasts the Möbius addition to an (N, K, D) tensor
(134 GB in fp32 at the benchmark's 65536 x 1000 x 512), which neither eager nor ``torch.compile``
can run; the baseline is the two-matmul form a careful user writes instead (two (N, K) products
``x @ p.T`` and ``x @ a.T`` and per-class scalars), so the comparison is against the best eager
version, not a strawman. ``hyperbolic_mlr_ce_broadcast`` keeps hyptorch's form for small inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _artanh(x):
    x = x.clamp(-1 + 1e-5, 1 - 1e-5)
    return 0.5 * (torch.log1p(x) - torch.log1p(-x))


def _project(x, c, eps=1e-3):
    norm = x.norm(dim=-1, keepdim=True, p=2).clamp_min(1e-5)
    maxnorm = (1 - eps) / (c ** 0.5)
    return torch.where(norm > maxnorm, x / norm * maxnorm, x)


def _mobius_add(x, y, c):
    xy = (x * y).sum(dim=-1, keepdim=True)
    x2 = x.pow(2).sum(dim=-1, keepdim=True)
    y2 = y.pow(2).sum(dim=-1, keepdim=True)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return num / (1 + 2 * c * xy + c ** 2 * x2 * y2)


def poincare_expmap0(x, *, c=0.1, clip_r=2.0, eps=1e-3):
    if clip_r is not None:
        x_norm = x.norm(dim=-1, keepdim=True) + 1e-5
        x = torch.minimum(torch.ones_like(x_norm), clip_r / x_norm) * x
    sqrt_c = c ** 0.5
    u_norm = x.norm(dim=-1, p=2, keepdim=True).clamp_min(1e-5)
    y = torch.tanh((sqrt_c * u_norm).clamp(-15, 15)) * x / (sqrt_c * u_norm)
    return _project(y, c, eps)


def poincare_distance(x, y, *, c=0.1):
    sqrt_c = c ** 0.5
    return 2 / sqrt_c * _artanh(sqrt_c * _mobius_add(-x, y, c).norm(dim=-1, p=2))


def hyp_pc_loss(z, *, c=0.1):
    if z.shape[0] == 0:
        return z.sum()
    half = z.shape[0] // 2
    return poincare_distance(z[:half], z[half:], c=c).sum() / z.shape[0]


def hyperbolic_mlr_ce(x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean"):
    """z = (-p) ⊕_c x expanded: with A = 1 - 2c<x,p> + c|x|², B = 1 - c|p|² and
    D = 1 - 2c<x,p> + c²|p|²|x|², <z,a> = (B<x,a> - A<p,a>)/D and
    |z|² = (A²|p|² - 2AB<x,p> + B²|x|²)/D²."""
    sqrt_c = c ** 0.5
    x2 = x.pow(2).sum(dim=1, keepdim=True)  # (N, 1)
    p2 = p.pow(2).sum(dim=1)  # (K,)
    xp = x @ p.T  # (N, K)
    xa = x @ a.T
    pa = (p * a).sum(dim=1)
    a_norm = a.norm(dim=1)
    big_a = 1 - 2 * c * xp + c * x2
    big_b = 1 - c * p2
    big_d = 1 - 2 * c * xp + c**2 * p2 * x2
    za = (big_b * xa - big_a * pa) / big_d
    z2 = (big_a.pow(2) * p2 - 2 * big_a * big_b * xp + big_b.pow(2) * x2) / big_d.pow(2)
    k = 2 / (1 - c * p2) * a_norm / sqrt_c
    logits = k * torch.asinh(2 * sqrt_c * za / (a_norm * (1 - c * z2)))
    active = target != ignore_index
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction)


def hyperbolic_mlr_ce_broadcast(x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean"):
    """hyptorch's form: the Möbius addition broadcast to (N, K, D)."""
    sqrt_c = c ** 0.5
    lambda_p = 2 / (1 - c * p.pow(2).sum(dim=1))
    a_norm = a.norm(dim=1)
    k = lambda_p * a_norm / sqrt_c
    z = _mobius_add(-p[None, :, :], x[:, None, :], c)  # (N, K, D)
    num = 2 * sqrt_c * (z * a[None]).sum(dim=-1)
    den = a_norm[None] * (1 - c * z.pow(2).sum(dim=-1))
    logits = k[None] * torch.asinh(num / den)
    active = target != ignore_index
    logits = torch.where(active[:, None], logits, torch.zeros_like(logits))
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction)
