r"""Comp-sum losses: cross-entropy, generalized cross-entropy, MAE and the sum-exponential loss.

Paper P13 — *Cross-Entropy Loss Functions: Theoretical Analysis and Applications*
(Mao, Mohri, Zhong, ICML 2023).

For logits $z \in \mathbb{R}^C$, label $y$ and $p = \operatorname{softmax}(z)$,

$$
u = \sum_{k \ne y} e^{z_k - z_y} = \frac{1}{p_y} - 1, \qquad
\ell_\tau(z, y) = \Phi^\tau(u) =
\begin{cases}
  \log(1 + u) = -\log p_y & \tau = 1 \\[2pt]
  \dfrac{(1 + u)^{1-\tau} - 1}{1 - \tau} = \dfrac{1 - p_y^{\tau - 1}}{\tau - 1} & \tau \ne 1
\end{cases}
$$

with gradient $\partial \ell_\tau / \partial z_k = p_y^{\tau-1}\,(p_k - \delta_{ky})$ for every
$\tau$. Special cases: $\tau = 0$ sum-exponential loss $1/p_y - 1$;
$\tau = 1$ cross-entropy; $\tau \in (1, 2)$ generalized cross-entropy with
$q = \tau - 1$; $\tau = 2$ mean absolute error $1 - p_y$.

Semantics
---------
- ``logits``: (N, C) real, C >= 1. ``target``: (N,) integers in [0, C) or ``ignore_index``.
- ``tau`` >= 0 (finite). For $\tau \ne 1$ the loss is computed as
  $-\operatorname{expm1}((\tau-1)\log p_y)/(\tau-1)$, which is exact near $\tau = 1$.
  For $\tau < 1$ the loss grows like $p_y^{\tau-1}$ and overflows to ``inf`` when
  $p_y$ underflows; that is the mathematical value, not an error.
- ``weight``: optional (C,) class weights; row *i* is weighted by ``weight[target[i]]``
  as in ``torch.nn.functional.cross_entropy``. Class weights receive no gradient.
- Rows whose target equals ``ignore_index`` contribute loss 0 and gradient exactly 0 (even when
  their logits are NaN) and weight 0.
- ``reduction``: ``"none"`` gives the (N,) weighted per-row losses; ``"sum"`` their sum;
  ``"mean"`` (default) the sum divided by the total weight of non-ignored rows — NaN when every
  row is ignored (0/0), matching PyTorch.
- NaN anywhere in a non-ignored row gives NaN for that row. A row containing ``+inf`` gives NaN;
  ``-inf`` entries are probability-zero classes (a ``-inf`` target logit gives an infinite loss
  for $\tau \le 1$). An all ``-inf`` row is NaN.
- Out-of-range labels raise ``ValueError`` (accelerated kernels, which cannot raise without a
  device synchronisation, return NaN for that row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_class_weight, check_real, reduce_rows, reduce_rows_grad, row_loss_inputs

__all__ = ["comp_sum_loss", "comp_sum_loss_grad"]


def _prepare(logits, target, tau, weight, ignore_index, reduction):
    z, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    w = as_class_weight(weight, "weight", z.shape[1])
    tau = check_real(tau, "tau", low=0.0)
    row_weight = np.where(active, 1.0 if w is None else w[y], 0.0)
    return z, y, active, row_weight, tau


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def comp_sum_loss(logits, target, *, tau=1.0, weight=None, ignore_index=-100, reduction="mean"):
    """Comp-sum loss $\\Phi^\\tau$ of P13 (CE at ``tau=1``, GCE, MAE at ``tau=2``, exp at ``tau=0``)."""
    z, y, active, row_weight, tau = _prepare(logits, target, tau, weight, ignore_index, reduction)
    rows = np.arange(z.shape[0])
    log_py = np.where(active, _log_softmax(z)[rows, y], 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        if tau == 1.0:
            loss = -log_py
        else:
            loss = -np.expm1((tau - 1.0) * log_py) / (tau - 1.0)
    return reduce_rows(np.where(active, row_weight * loss, 0.0), row_weight, reduction)


def comp_sum_loss_grad(grad, logits, target, *, tau=1.0, weight=None, ignore_index=-100, reduction="mean"):
    """Vector-Jacobian product: ``grad`` (shaped like the loss) times d loss / d logits, an (N, C) array."""
    z, y, active, row_weight, tau = _prepare(logits, target, tau, weight, ignore_index, reduction)
    row_grad = reduce_rows_grad(grad, row_weight, reduction)
    n, c = z.shape
    log_p = _log_softmax(z)
    log_py = log_p[np.arange(n), y]
    with np.errstate(over="ignore", invalid="ignore"):
        power = 1.0 if tau == 1.0 else np.exp((tau - 1.0) * log_py)  # p_y^(tau-1)
        factor = np.where(active, row_grad * row_weight * power, 0.0)
        onehot = np.eye(c)[y]
        return np.where(active[:, None], factor[:, None] * (np.exp(log_p) - onehot), 0.0)
