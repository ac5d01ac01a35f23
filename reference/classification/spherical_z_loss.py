r"""Spherical Z-loss: a shift- and scale-invariant loss on standardised logits.

Paper P5 — *The Z-loss: a shift and scale invariant classification loss belonging to the
Spherical Family* (de Brébisson, Vincent, 2016; arXiv 1604.08859).

This is de Brébisson & Vincent's Z-loss. It is **not** the PaLM / T5X "z-loss", the auxiliary
penalty $\lambda \log^2 Z$ on the softmax normaliser (Liger-Kernel's ``lse_square_scale``);
that is a different technique.

For logits $o \in \mathbb{R}^C$ and label $c$,

$$
\mu = \frac{1}{C}\sum_k o_k, \qquad
\sigma = \sqrt{\frac{1}{C}\sum_k (o_k - \mu)^2}, \qquad
z_k = \frac{o_k - \mu}{\sigma + \varepsilon}, \qquad
\ell(o, c) = \frac{1}{a}\operatorname{softplus}\bigl(a\,(b - z_c)\bigr),
$$

with $a > 0$ the sharpness and $b$ the location. With $\tilde\sigma = \sigma + \varepsilon$
and $s = \operatorname{sigmoid}(a(b - z_c))$, the gradient is

$$
\frac{\partial \ell}{\partial o_k} = -\frac{s}{\tilde\sigma}
\Bigl[\delta_{kc} - \frac{1}{C} - \frac{(o_c - \mu)(o_k - \mu)}{C\,\sigma\,\tilde\sigma}\Bigr].
$$

It sums to 0 over $k$; for $\varepsilon = 0$ also $\sum_k o_k\,\partial\ell/\partial o_k = 0$
(the loss is invariant to $o \to \lambda o + \kappa$, $\lambda > 0$).

Semantics
---------
- ``logits``: (N, C) real, C >= 1. ``target``: (N,) integers in [0, C) or ``ignore_index``.
- ``a`` > 0, ``b`` and ``eps`` > 0, all finite. Defaults ``a=1, b=0`` are the authors' example
  (the paper tunes both per task); ``eps=1e-6`` is added to $\sigma$ (the authors use 1e-12;
  the larger value bounds the gradient on constant rows, see below).
- $\sigma$ is the population standard deviation computed in two passes (centre, then square);
  never $E[o^2] - \mu^2$, which cancels catastrophically. Logits whose squares overflow
  float64 ($|o| \gtrsim 10^{154}$) are outside the supported range.
- Constant rows and C = 1: $\sigma = 0$, so $z = 0$ and the loss is
  $\operatorname{softplus}(ab)/a$. $\sigma$ has a kink there; the gradient is taken with
  the last bracket term set to 0 (its limit as $\sigma \to 0$), giving
  $-(s/\varepsilon)(\delta_{kc} - 1/C)$, of order $1/\varepsilon$. For C = 1 it is 0.
- Softplus is evaluated as $\max(x, 0) + \operatorname{log1p}(e^{-|x|})$.
- No class weights. Rows whose target equals ``ignore_index`` contribute loss 0 and gradient exactly 0
  (even when their logits are NaN) and are excluded from the mean.
- ``reduction``: ``"none"`` gives the (N,) per-row losses; ``"sum"`` their sum; ``"mean"`` (default)
  the sum divided by the number of non-ignored rows — NaN when every row is ignored (0/0), or N = 0.
- Any NaN or $\pm\infty$ in a non-ignored row gives NaN loss and gradient for that row.
- Out-of-range labels raise ``ValueError`` (accelerated kernels return NaN for that row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_real, reduce_rows, reduce_rows_grad, row_loss_inputs

__all__ = ["spherical_z_loss", "spherical_z_loss_grad"]


def _prepare(logits, target, a, b, eps, ignore_index, reduction):
    o, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    a = check_real(a, "a", low=0.0, low_open=True)
    b = check_real(b, "b")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    return o, y, active, active.astype(np.float64), a, b, eps


def _standardise(o: np.ndarray, eps: float):
    """Centred logits d, population std sigma (two-pass) and sigma + eps, per row."""
    d = o - o.mean(axis=1, keepdims=True)
    sigma = np.sqrt((d * d).mean(axis=1))
    return d, sigma, sigma + eps


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def spherical_z_loss(logits, target, *, a=1.0, b=0.0, eps=1e-6, ignore_index=-100, reduction="mean"):
    """Z-loss of P5 (de Brébisson & Vincent): $\\operatorname{softplus}(a(b - z_c))/a$ on standardised logits."""
    o, y, active, row_weight, a, b, eps = _prepare(logits, target, a, b, eps, ignore_index, reduction)
    with np.errstate(invalid="ignore", over="ignore"):
        d, _, sigma_t = _standardise(o, eps)
        z_y = d[np.arange(o.shape[0]), y] / sigma_t
        loss = _softplus(a * (b - z_y)) / a
    return reduce_rows(np.where(active, loss, 0.0), row_weight, reduction)


def spherical_z_loss_grad(grad, logits, target, *, a=1.0, b=0.0, eps=1e-6, ignore_index=-100, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d logits, an (N, C) array."""
    o, y, active, row_weight, a, b, eps = _prepare(logits, target, a, b, eps, ignore_index, reduction)
    row_grad = reduce_rows_grad(grad, row_weight, reduction)
    n, c = o.shape
    with np.errstate(invalid="ignore", over="ignore"):
        d, sigma, sigma_t = _standardise(o, eps)
        z_y = d[np.arange(n), y] / sigma_t
        x = a * (b - z_y)
        s = np.exp(x - _softplus(x))  # sigmoid(x), stable for either sign
        # u_k = (o_k - mu) / sigma; its term vanishes in the limit sigma -> 0 (constant row, C = 1)
        u = np.divide(d, sigma[:, None], out=np.zeros_like(d), where=sigma[:, None] > 0)
        bracket = np.eye(c)[y] - 1.0 / c - z_y[:, None] * u / c
        factor = np.where(active, row_grad * row_weight * s / sigma_t, 0.0)
        return np.where(active[:, None], -factor[:, None] * bracket, 0.0)
