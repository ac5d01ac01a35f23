r"""Smooth adversarial comp-sum losses: a comp-sum loss on the clean logits plus a smooth penalty on
how far the adversarial logits move the label-relative margins.

Paper P13 — *Cross-Entropy Loss Functions: Theoretical Analysis and Applications* (Mao, Mohri, Zhong, ICML 2023).

For clean logits $z \in \mathbb{R}^C$, adversarial logits $z'$ (the model's scores at an adversarial
input $x'$ found outside the library, e.g. by PGD within $\|x' - x\|_p \le \gamma$) and label $y$,
let $\Delta(z, y) = (z_y - z_k)_{k \ne y}$ be the vector of label-relative margins. Then

$$
\tilde\ell_{\tau,\nu}(z, z', y) = \Phi^\tau\!\Big(\sum_{k \ne y} e^{z_k - z_y}\Big)
  + \nu\,\big\|\Delta(z', y) - \Delta(z, y)\big\|_2,
\qquad
\big\|\Delta(z', y) - \Delta(z, y)\big\|_2 = \Big(\sum_{k} (e_k - e_y)^2\Big)^{1/2},\; e = z' - z,
$$

where $\Phi^\tau$ is the comp-sum transform of
[`comp_sum_loss`](comp_sum_loss.md) ($\tau = 1$ cross-entropy, $\tau = 2$ MAE, ...). With
$d_k = e_k - e_y$ and $r = \|d\|_2$ the regulariser's gradient is

$$
\frac{\partial r}{\partial z'_k} = -\frac{\partial r}{\partial z_k} = \frac{d_k - \delta_{ky} \sum_j d_j}{r}
\quad (r > 0), \qquad 0 \text{ at } r = 0,
$$

added to the comp-sum gradient $p_y^{\tau-1}(p_k - \delta_{ky})$ of the clean logits.

Semantics
---------
- ``logits`` (clean) and ``adv_logits``: (N, C) real, same shape, C >= 1. ``target``: (N,) integers
  in [0, C) or ``ignore_index``. Both logit arrays receive gradients.
- **Argument of the norm.** The paper's smooth term penalises the change of the margin vector
  $\Delta_h(x, y) = (h(x, y) - h(x, y'))_{y'}$, not of the raw score vector: the term is therefore
  invariant to adding a per-row constant to either logit row, as the comp-sum loss itself is. (The
  $k = y$ entry of $d$ is 0, so including or excluding it gives the same norm.) A penalty on the raw
  difference $\|z' - z\|_2$ is a different loss; the conformance suite carries it as a wrong port.
- **Default ``nu = 1``.** For $\tau \ge 1$ the comp-sum loss is 1-Lipschitz in the margin vector
  ($\|\nabla_\Delta \Phi^\tau\|_2 = p_y^{\tau-1}\|(p_k)_{k\ne y}\|_2 \le 1$), so with $\nu = 1$ the
  smooth loss upper-bounds the comp-sum loss at the adversarial logits, the bound the smooth term
  stands in for. That makes 1 this library's default; the paper treats $\nu$ as a hyper-parameter
  to tune, so pass your own. ``nu`` >= 0, finite. ``tau`` >= 0, finite, default 1 (cross-entropy), as in
  ``comp_sum_loss`` (no class weights here). $\gamma$ and the attack belong to the caller.
- The norm is not differentiable at $d = 0$ (adversarial logits that move every margin by the same
  amount, e.g. $z' = z$, or C = 1); its gradient is defined as 0 there, so such rows get the plain
  comp-sum gradient.
- Rows whose target equals ``ignore_index`` contribute loss 0 and gradient exactly 0 to both inputs
  (even when their logits are NaN). ``reduction``: ``"none"`` gives the (N,) per-row losses,
  ``"sum"`` their sum, ``"mean"`` (default) their mean over non-ignored rows — NaN when every row
  is ignored.
- NaN in either row gives NaN for that row (and NaN gradients across it). ``+inf`` in the clean row
  gives NaN (as in ``comp_sum_loss``); an infinite difference $e_k$ gives an infinite norm, and
  $\infty - \infty$ (an infinity in the same place in both rows) gives NaN. ``nu = 0`` with an
  infinite norm is $0 \cdot \infty$ = NaN: the arithmetic is not special-cased.
- Out-of-range labels raise ``ValueError`` (the accelerated kernels return NaN for the row instead).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_matrix, check_real, reduce_rows, reduce_rows_grad, row_loss_inputs
from .comp_sum_loss import comp_sum_loss, comp_sum_loss_grad

__all__ = ["smooth_adv_comp_sum_loss", "smooth_adv_comp_sum_loss_grad"]


def _prepare(logits, target, adv_logits, tau, nu, ignore_index, reduction):
    z, y, active = row_loss_inputs(logits, target, ignore_index, reduction)
    z_adv = as_float_matrix(adv_logits, "adv_logits")
    if z_adv.shape != z.shape:
        raise ValueError(f"adv_logits must have the shape of logits {z.shape}, got {z_adv.shape}")
    z_adv = np.where(active[:, None], z_adv, 0.0)
    tau = check_real(tau, "tau", low=0.0)
    nu = check_real(nu, "nu", low=0.0)
    return z, y, z_adv, active, tau, nu


def _margin_shift(z, z_adv, y):
    """``d_k = e_k - e_y`` with ``e = z_adv - z``: how far the adversarial logits move each margin."""
    with np.errstate(invalid="ignore"):
        e = z_adv - z
        return e - e[np.arange(len(y)), y][:, None]


def smooth_adv_comp_sum_loss(logits, target, adv_logits, *, tau=1.0, nu=1.0, ignore_index=-100,
                             reduction="mean"):
    """Comp-sum loss of the clean logits plus ``nu`` times the l2 change of the label-relative margins."""
    z, y, z_adv, active, tau, nu = _prepare(logits, target, adv_logits, tau, nu, ignore_index, reduction)
    ce = comp_sum_loss(z, np.where(active, y, ignore_index), tau=tau, ignore_index=ignore_index, reduction="none")
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.sqrt(np.sum(_margin_shift(z, z_adv, y) ** 2, axis=1))
        rows = np.where(active, ce + nu * r, 0.0)
    return reduce_rows(rows, active.astype(np.float64), reduction)


def smooth_adv_comp_sum_loss_grad(grad, logits, target, adv_logits, *, tau=1.0, nu=1.0, ignore_index=-100,
                                  reduction="mean"):
    """Vector-Jacobian product: ``{"logits": (N, C), "adv_logits": (N, C)}``."""
    z, y, z_adv, active, tau, nu = _prepare(logits, target, adv_logits, tau, nu, ignore_index, reduction)
    row_grad = reduce_rows_grad(grad, active.astype(np.float64), reduction)
    labels = np.where(active, y, ignore_index)
    grad_ce = comp_sum_loss_grad(grad, z, labels, tau=tau, ignore_index=ignore_index, reduction=reduction)
    d = _margin_shift(z, z_adv, y)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = np.sqrt(np.sum(d**2, axis=1))
        at_label = np.eye(z.shape[1], dtype=bool)[y]
        unit = (d - np.where(at_label, d.sum(axis=1, keepdims=True), 0.0)) / np.where(r == 0, 1.0, r)[:, None]
        unit = np.where((r == 0)[:, None], 0.0, unit)
        grad_reg = np.where(active[:, None], (nu * row_grad)[:, None] * unit, 0.0)
    return {"logits": grad_ce - grad_reg, "adv_logits": grad_reg}
