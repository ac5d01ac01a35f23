r"""Ramp loss: the hinge loss clipped at 1, for binary classification with scores.

Paper P28 — *Out-Of-Domain Unlabeled Data Improves Generalization* (Saberi, Najafi, Heidari,
Movasaghinia, Motahari, Khalaj, ICLR 2024).

The paper's linear experiments train with the ramp loss, a bounded (hence robust) surrogate of the
0-1 loss. For a real score $f_i$, a label $y_i \in \{-1, +1\}$ and a slope $\kappa > 0$,

$$
\ell(f_i, y_i) = \min\bigl(1, \max(0,\, 1 - \kappa\, y_i f_i)\bigr)
= \begin{cases}
  1 & \kappa y_i f_i \le 0 \\
  1 - \kappa y_i f_i & 0 < \kappa y_i f_i < 1 \\
  0 & \kappa y_i f_i \ge 1
\end{cases}
$$

with gradient $\partial \ell / \partial f_i = -\kappa\, y_i$ on the linear piece
$0 < \kappa y_i f_i < 1$ and $0$ elsewhere.

Semantics
---------
- ``scores``: (N,) real, N >= 0. ``target``: (N,) integers, each in $\{-1, 0, +1\}$: $+1$ is the
  positive class, $-1$ **and** $0$ the negative class, so both the $\pm 1$ convention of the
  paper and the $\{0, 1\}$ convention of PyTorch's binary losses work unchanged. Any other label
  raises ``ValueError`` (accelerated kernels, which cannot raise without a device
  synchronisation, return NaN for that element instead). Float labels are a ``TypeError``.
- ``kappa`` > 0 (finite), default 1: the slope of the linear piece; the loss is 1 up to the
  decision boundary and 0 beyond margin $1/\kappa$.
- ``reduction``: ``"mean"`` (default; the paper's experiments sum, use ``"sum"`` for that),
  ``"sum"``, or ``"none"`` for the (N,) per-element losses. With N = 0 the sum is 0 and the mean
  is NaN (0/0), as in PyTorch.
- Kinks: the gradient is $0$ at both corners ($\kappa y f = 0$ and $\kappa y f = 1$), i.e. the
  linear piece is the open interval; both are valid subgradients of a function that is flat on
  the other side, and 0 is what a clipped loss returns when a sample sits exactly on a corner.
- NaN scores give NaN loss and NaN gradient for that element. $\pm\infty$ scores lie on a flat
  piece: loss 0 or 1, gradient 0.
- Gradients flow to ``scores`` only.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, as_int_array, check_real, check_reduction

__all__ = ["ramp_loss", "ramp_loss_grad"]


def _prepare(scores, target, kappa, reduction):
    f = as_float_array(scores, "scores", 1, "(N,)")
    t = as_int_array(target, "target", f.shape, what="binary labels in {-1, 0, +1}")
    bad = (t != -1) & (t != 0) & (t != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target[{i}] = {t[i]} is not a binary label: use +1 for the positive class "
                         "and -1 (or 0) for the negative class")
    y = np.where(t == 1, 1.0, -1.0)
    kappa = check_real(kappa, "kappa", low=0.0, low_open=True)
    check_reduction(reduction)
    return f, y, kappa


def _reduce(rows: np.ndarray, reduction: str):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return np.float64(rows.sum())
    with np.errstate(invalid="ignore"):
        return np.float64(rows.sum() / rows.size) if rows.size else np.float64(np.nan)


def ramp_loss(scores, target, *, kappa=1.0, reduction="mean"):
    """Ramp loss $\\min(1, \\max(0, 1 - \\kappa y f))$ of binary scores (labels $\\pm 1$ or $\\{0, 1\\}$)."""
    f, y, kappa = _prepare(scores, target, kappa, reduction)
    with np.errstate(invalid="ignore"):
        margin = kappa * y * f
        loss = np.clip(1.0 - margin, 0.0, 1.0)
    return _reduce(np.where(np.isnan(margin), np.nan, loss), reduction)


def ramp_loss_grad(grad, scores, target, *, kappa=1.0, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d scores, an (N,) array."""
    f, y, kappa = _prepare(scores, target, kappa, reduction)
    grad = np.asarray(grad, dtype=np.float64)
    n = f.shape[0]
    if reduction == "none":
        if grad.shape != (n,):
            raise ValueError(f"grad must have shape ({n},) for reduction='none', got {grad.shape}")
        row_grad = grad
    else:
        if grad.shape != ():
            raise ValueError(f"grad must be a scalar for reduction={reduction!r}, got shape {grad.shape}")
        row_grad = np.full(n, float(grad) / (max(n, 1) if reduction == "mean" else 1))
    with np.errstate(invalid="ignore"):
        margin = kappa * y * f
        linear = (margin > 0.0) & (margin < 1.0)
        return np.where(np.isnan(margin), np.nan, np.where(linear, -kappa * y * row_grad, 0.0))
